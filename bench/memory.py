"""Peak memory (RSS) against input length: does it stay flat however long the recording?

    python -m bench.memory [--durations 600,3600,10800] [--engine noop|ctranslate2] [--write docs/benchmarks.md]
    python -m bench.memory --durations 600,3600 --engine ctranslate2 --peers 600 --write docs/benchmarks.md

The two engines write two sections of docs/benchmarks.md: ``memory`` (noop: no model) and
``memory_model`` (the bundled tiny.en), so a memory figure always says which it is.

Builds speech inputs of each duration (seconds) from the repository's test media (talk_tts,
ivr_prompts and jfk concatenated, ~4 min, looped), encoded compactly as Opus in a temporary
directory (a 3-hour file is ~20 MB; never committed). For each input, measures as a user runs
them:

* ``vtp transcribe`` (a fresh process);
* the distributed path: a fresh ``vtp worker --queue cpu`` and ``--queue gpu`` on a private
  ``redis-server`` (free loopback port), processing one ``vtp submit --wait`` of the input;
  each worker's peak, and the submitting command's.

A process's peak is the largest sum of RSS over it and its descendants (ffmpeg is a child of
the stage that runs it), sampled every 20 ms from /proc, or the kernel's own high-water mark of
the Python process (``VmHWM``), whichever is larger. With ``--engine noop`` (the default) no model
runs, so a 3-hour input takes a minute or two and the numbers isolate the audio handling; with
``ctranslate2`` the bundled tiny.en transcribes it (slow on a CPU: ~4 min per hour of speech).

``--peers 600`` also measures, for those durations, faster-whisper itself on the same input in
a fresh process (the bundled tiny.en, int8, beam 5, its Silero VAD on): ``WhisperModel.transcribe``
(sequential) and ``BatchedInferencePipeline`` (batch 8), the memory a user of the library sees.

Target: the 3-hour peak under 600 MB and within 1.3x of the 10-minute peak for every process;
with the model, ``vtp transcribe`` at or under sequential faster-whisper's peak at 10 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from app import constants
from app.media import ffmpeg_exe
from bench.report import commit, machine, write_section
from tests.support.dag_cluster import free_port

DATA = ROOT / "tests" / "data"
SPEECH = ("talk_tts.mp4", "ivr_prompts.mp4", "jfk.flac")
TARGET_MB = 600
TARGET_RATIO = 1.3
SAMPLE_S = 0.02


# -- inputs ---------------------------------------------------------------------------------


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True, timeout=900)


def make_inputs(work: Path, durations: list[int]) -> dict[int, Path]:
    """One Opus file per duration. The speech is encoded once (the shortest duration, or 10 min)
    and longer inputs loop it by stream copy, which takes seconds instead of minutes."""
    base = work / "speech.flac"
    inputs = [a for name in SPEECH for a in ("-i", str(DATA / name))]
    chain = "".join(f"[{i}:a]aresample=16000,aformat=channel_layouts=mono[a{i}];" for i in range(len(SPEECH)))
    chain += "".join(f"[a{i}]" for i in range(len(SPEECH))) + f"concat=n={len(SPEECH)}:v=0:a=1[out]"
    ffmpeg(*inputs, "-filter_complex", chain, "-map", "[out]", "-c:a", "flac", str(base))
    unit_s = min(min(durations), 600)
    unit = work / f"speech_{unit_s}.opus"
    ffmpeg("-stream_loop", "-1", "-i", str(base), "-t", str(unit_s),
           "-c:a", "libopus", "-b:a", "16k", "-application", "voip", "-compression_level", "0", str(unit))
    out = {}
    for d in durations:
        dest = work / f"speech_{d}.opus"
        if d == unit_s:
            dest = unit
        else:
            ffmpeg("-stream_loop", "-1", "-i", str(unit), "-t", str(d), "-c", "copy", str(dest))
        out[d] = dest
    return out


# -- measuring ------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


class PeakRSS:
    """Samples a process tree's RSS in a thread until ``stop()``; peaks in MB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tree_kb = 0
        self.hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(SAMPLE_S)

    def sample(self) -> None:
        self.tree_kb = max(self.tree_kb, sum(_status_kb(p, "VmRSS:") for p in _tree(self.pid)))
        self.hwm_kb = max(self.hwm_kb, _status_kb(self.pid, "VmHWM:"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()  # a worker is still alive here: its high-water mark is exact
        return max(self.tree_kb, self.hwm_kb) / 1024


@dataclass
class Env:
    work: Path
    redis_url: str

    def vars(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_", "AWS_"))}
        env.update(REDIS_URL=self.redis_url, VTP_DATA_DIR=str(self.work / "data"), PYTHONWARNINGS="ignore")
        return env


def vtp(env: Env, *args: str, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env.vars(), stdout=out, stderr=subprocess.STDOUT)


def run_measured(env: Env, *args: str, log: Path, timeout: float) -> float:
    return peak_of(vtp(env, *args, log=log), timeout, f"vtp {' '.join(args)}", log)


def peak_of(proc: subprocess.Popen, timeout: float, what: str, log: Path) -> float:
    """Peak RSS of ``proc`` (and its children) until it exits; a failure stops the bench with its log."""
    meter = PeakRSS(proc.pid)
    try:
        rc = proc.wait(timeout)
    finally:
        peak = meter.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        sys.exit(f"{what} exited {rc}:\n{log.read_text()[-3000:]}")
    return peak


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        sys.exit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def wait_healthy(env: Env, names: list[tuple[str, str]], procs: list[subprocess.Popen], timeout: float = 120) -> None:
    import redis

    client = redis.Redis.from_url(env.redis_url)
    try:
        deadline = time.monotonic() + timeout
        for queue, name in names:
            while not client.exists(constants.health_key(queue, name)):
                if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                    sys.exit(f"worker {name} did not start; see {env.work}")
                time.sleep(0.05)
    finally:
        client.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_distributed(env: Env, source: Path, engine: str, d: int, timeout: float) -> dict[str, float]:
    """Fresh workers for this input alone, so each peak is this input's."""
    logs = env.work / "logs"
    workers = {
        queue: vtp(env, "worker", "--queue", queue, "--name", f"mem-{queue}-{d}", "-q", log=logs / f"worker-{queue}-{d}.log")
        for queue in ("cpu", "gpu")
    }
    try:
        wait_healthy(env, [(q, f"mem-{q}-{d}") for q in workers], list(workers.values()))
        meters = {q: PeakRSS(p.pid) for q, p in workers.items()}
        submit = run_measured(
            env, "submit", "--wait", "-q", "--no-reuse", "--engine", engine, "--formats", "json",
            "-o", str(env.work / "out-dag"), str(source), log=logs / f"submit-{d}.log", timeout=timeout,
        )
        peaks = {f"`vtp worker --queue {q}`": m.stop() for q, m in meters.items()}
    finally:
        for p in workers.values():
            stop(p)
    peaks["`vtp submit --wait`"] = submit
    return peaks


PEER_SCRIPT = """
import os, sys
from faster_whisper import BatchedInferencePipeline, WhisperModel
from workers.engines.ctranslate2 import bundled_model_path
model = WhisperModel(str(bundled_model_path()), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 0)
if sys.argv[1] == "batched":
    segments, _ = BatchedInferencePipeline(model).transcribe(sys.argv[2], beam_size=5, batch_size=8, language="en")
else:
    segments, _ = model.transcribe(sys.argv[2], beam_size=5, language="en", vad_filter=True)
print(sum(len(s.text) for s in segments))
"""


def run_peer(env: Env, kind: str, source: Path, log: Path, timeout: float) -> float:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, kind, str(source)], cwd=ROOT, env={**env.vars(), "PYTHONPATH": str(ROOT)},
                                stdout=out, stderr=subprocess.STDOUT)
    return peak_of(proc, timeout, f"faster-whisper {kind}", log)


def label(d: int) -> str:
    return f"{d // 3600} h" if d % 3600 == 0 else f"{d // 60} min" if d % 60 == 0 else f"{d} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durations", default="600,3600,10800", help="input lengths in seconds (default 600,3600,10800)")
    ap.add_argument("--engine", choices=["noop", "ctranslate2"], default="noop", help="default noop: no model, audio handling only")
    ap.add_argument("--peers", default="", help="durations (s) at which faster-whisper sequential and batched are measured too")
    ap.add_argument("--write", type=Path, help="replace the memory section of this markdown file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (inputs, logs)")
    args = ap.parse_args()
    durations = sorted(int(v) for v in args.durations.split(","))
    timeout = 600 if args.engine == "noop" else 3 * 3600

    work = Path(tempfile.mkdtemp(prefix="vtp-memory-bench-"))
    (work / "logs").mkdir()
    redis_proc = None
    rows: list[tuple[int, str, float]] = []
    try:
        t0 = time.perf_counter()
        inputs = make_inputs(work, durations)
        print(f"inputs built in {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{label(d)} {p.stat().st_size / 1e6:.1f} MB" for d, p in inputs.items())
              + f"; machine: {machine()}", flush=True)
        redis_proc, redis_url = start_redis(work)
        env = Env(work, redis_url)
        for d in durations:
            t0 = time.perf_counter()
            local = run_measured(
                env, "transcribe", "-q", "--engine", args.engine, "--formats", "json", "-o", str(work / "out-local"),
                str(inputs[d]), log=work / "logs" / f"transcribe-{d}.log", timeout=timeout,
            )
            results = {"`vtp transcribe`": local, **measure_distributed(env, inputs[d], args.engine, d, timeout)}
            if str(d) in args.peers.split(","):
                for kind, name in (("sequential", "faster-whisper sequential (beam 5)"), ("batched", "faster-whisper batched (bs 8, beam 5)")):
                    results[name] = run_peer(env, kind, inputs[d], work / "logs" / f"peer-{kind}-{d}.log", timeout)
            for process, mb in results.items():
                rows.append((d, process, mb))
            print(f"{label(d)}: " + ", ".join(f"{p} {mb:.0f} MB" for p, mb in results.items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if redis_proc is not None:
            stop(redis_proc)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    table, verdict, body = report(rows, durations, args.engine, args.peers)
    print()
    print(table)
    print()
    print(f"target: {verdict}")
    if args.write:
        if args.engine == "noop":
            write_section(args.write, "memory", "Memory against input length", body)
        else:
            write_section(args.write, "memory_model", "Memory against input length, with the model", body)


def report(rows: list[tuple[int, str, float]], durations: list[int], engine: str, peers: str = "") -> tuple[str, str, str]:
    """The table, the verdict against the target, and the docs/benchmarks.md section."""
    first = {p: mb for d, p, mb in rows if d == durations[0]}
    lines = [f"| input | process | peak RSS MB | vs {label(durations[0])} |", "|---|---|---|---|"]
    for d, process, mb in rows:
        ratio = f"{mb / first[process]:.2f}x" if process in first else "-"
        lines.append(f"| {label(d)} | {process} | {mb:.0f} | {ratio} |")
    table = "\n".join(lines)
    seq = [mb for d, p, mb in rows if d == durations[0] and p.startswith("faster-whisper sequential")]
    # Without the model the bound is absolute; with it, sequential faster-whisper's own peak at the
    # shortest input (when measured), and flat either way.
    limit = TARGET_MB if engine == "noop" or not seq else seq[0]
    verdict = ", ".join(
        f"{p} {'meets' if mb <= limit and mb / first[p] <= TARGET_RATIO else 'misses'}"
        for d, p, mb in rows if d == durations[-1] and p.startswith("`vtp") and not p.startswith("`vtp submit")
    )
    target = (f"at {label(durations[-1])} under {limit:.0f} MB"
              + ("" if limit == TARGET_MB else f" (sequential faster-whisper's peak at {label(durations[0])})")
              + f" and within {TARGET_RATIO}x of the {label(durations[0])} peak, for `vtp transcribe` and each worker")
    body = (
        f"Machine: {machine()}. Commit: {commit()}. Engine: `{engine}`"
        + (" (no model: the audio handling alone)" if engine == "noop" else " (bundled tiny.en, int8)")
        + f". Command: `python -m bench.memory --durations {','.join(map(str, durations))} --engine {engine}"
        + (f" --peers {peers}" if peers else "") + " --write docs/benchmarks.md`.\n\n"
        "Inputs: the test media's speech (talk_tts + ivr_prompts + jfk, 4 min) looped to each length, Opus 16 kb/s. "
        "Peak RSS of each process with its children (ffmpeg), sampled every 20 ms, or the Python process's own "
        "high-water mark if larger; each worker is started fresh for each input and handles that one job.\n\n"
        f"{table}\n\n"
        f"Target: {target}: {verdict}."
    )
    return table, verdict, body

if __name__ == "__main__":
    main()
