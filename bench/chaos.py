"""Chaos: jobs of mixed lengths on 2 CPU + 2 GPU-queue workers that keep being SIGKILLed, and a
Redis that is killed -9 twice. Does every job end, with the right transcript?

    python -m bench.chaos [--jobs 30] [--max-minutes 20] [--engine noop|ctranslate2]
                          [--kill-every 5,20] [--redis-kills 2] [--write docs/benchmarks.md]

Inputs are built at run time by concatenating the repository's speech (tests/data) with ffmpeg:
``--jobs`` files whose lengths are spread geometrically from 8 s to ``--max-minutes``. Each is
first transcribed by the local runner (``vtp transcribe``'s code) for reference. Then a private
``redis-server`` (append-only file, ``appendfsync everysec`` as in production) and four workers
(``vtp worker --queue cpu`` ×2, ``--queue gpu`` ×2, subprocesses) start, every job is submitted at
once (``vtp submit --no-reuse``), and until every job has ended (or ``--timeout``):

* every 5–20 s (``--kill-every``) a random worker is SIGKILLed and started again;
* twice (``--redis-kills``), Redis is SIGKILLed and restarted from its append-only file, 3 s later;
* two of the submits (``--orphans``) "die" between writing the record and enqueueing the first
  stage: only the sweeper can move those jobs.

Reported: jobs done, failed (with their reasons), **lost** (not ended by the timeout), outputs
that differ from the local run (TXT, SRT, VTT and the JSON's segments), stage reruns (stage jobs
started more than once, from the workers' logs; stages that *completed* twice; the sweeper's
re-drives), and the longest time a job went without progress (its record unchanged), and with
no stage of it queued or running at all (what the sweeper exists for).

``--engine noop`` (default) keeps the GPU stage instant so the run is about the queue: extraction
and VAD still run for real on every second of audio. ``--engine ctranslate2`` uses the bundled
tiny.en model (pick fewer, shorter jobs on a small machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]

from app.config import Settings
from app.jobs import JobStore
from app.messages import JobRecord, TranscribeOptions
from bench.report import machine, write_section
from tests.support.dag_cluster import free_port, transcript_view
from workers.runtime.enqueue import connect, enqueue_first_stage
from workers.runtime.sweep import ArqStages
from workers.audio import ffmpeg_exe
from workers.sweeper import Sweeper

DATA = ROOT / "tests" / "data"
TALK = DATA / "talk_tts.mp4"  # 65 s of speech
JFK = DATA / "jfk.flac"  # 11 s
STARTED = re.compile(r"→ ([0-9a-f]{32}:[a-z]+(?::\d+)?):[a-z]+\(")


# -- inputs ---------------------------------------------------------------------------------


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True, timeout=900)


def build_inputs(work: Path, jobs: int, max_seconds: float, min_seconds: float = 8.0) -> list[Path]:
    """One long speech track (talk_tts and jfk alternating), cut to ``jobs`` geometric lengths."""
    reps = int(max_seconds // 76) + 1
    parts = [TALK, JFK] * reps
    inputs = [a for p in parts for a in ("-i", str(p))]
    chain = "".join(f"[{i}:a]aresample=16000,aformat=channel_layouts=mono[a{i}];" for i in range(len(parts)))
    chain += "".join(f"[a{i}]" for i in range(len(parts))) + f"concat=n={len(parts)}:v=0:a=1[out]"
    long = work / "long.flac"
    ffmpeg(*inputs, "-filter_complex", chain, "-map", "[out]", "-c:a", "flac", str(long))
    out = []
    for i in range(jobs):
        seconds = min_seconds * (max_seconds / min_seconds) ** (i / max(jobs - 1, 1))
        dest = work / "inputs" / f"job{i:02d}-{seconds:.0f}s.flac"
        dest.parent.mkdir(exist_ok=True)
        ffmpeg("-i", str(long), "-t", f"{seconds:.2f}", "-c:a", "flac", str(dest))
        out.append(dest)
    return out


def view(out_dir: Path, basename: str) -> dict:
    """What must not change between runs: the test suite's view of a transcript, and its duration."""
    return {**transcript_view(out_dir, basename), "duration": json.loads((out_dir / f"{basename}.json").read_text())["duration"]}


def local_references(inputs: list[Path], options: TranscribeOptions, out: Path) -> dict[str, dict]:
    from workers.local_runner import LocalRunner

    runner = LocalRunner(Settings.from_env({}))
    refs = {}
    for path in inputs:
        anyio.run(runner.run, path, options, out)
        refs[path.stem] = view(out, path.stem)
    return refs


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class Chaos:
    work: Path
    env_extra: dict[str, str]
    port: int = field(default_factory=free_port)
    redis: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_", "AWS_"))}
        return {**base, "REDIS_URL": self.url, "VTP_DATA_DIR": str(self.work / "data"), **self.env_extra}

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:7.1f} s  {what}")
        print(self.events[-1], flush=True)

    def start_redis(self) -> None:
        cmd = [
            shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.work), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--logfile", str(self.work / "redis.log"),
        ]
        self.redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # PONG only once the append-only file is loaded
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.send_signal(signal.SIGKILL)
        self.redis.wait(10)

    def start_worker(self, name: str) -> None:
        queue = name.split("-")[0]
        log = (self.work / f"worker-{name}.log").open("ab")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--queue", queue, "--name", name],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )

    def kill_worker(self, name: str) -> None:
        proc = self.workers[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("worker-*.log")))


# -- watching -------------------------------------------------------------------------------


@dataclass
class Watch:
    """Per job: when its record last changed, and the longest stretches without change / with
    nothing of it queued or running."""

    last_change: dict[str, float] = field(default_factory=dict)
    updated: dict[str, float] = field(default_factory=dict)
    orphan_since: dict[str, float] = field(default_factory=dict)
    longest_idle: float = 0.0
    longest_idle_job: str = ""
    longest_orphan: float = 0.0
    ended: dict[str, JobRecord] = field(default_factory=dict)


async def observe(chaos: Chaos, job_ids: list[str], watch: Watch, settings: Settings) -> None:
    """One look at every job that has not ended (skipped while Redis is down)."""
    redis = await connect(settings)
    store = JobStore(redis, where="chaos", outage_s=0.5)
    probe = Sweeper(store, None, ArqStages(redis, settings), settings)
    try:
        now = time.monotonic()
        for job_id in job_ids:
            if job_id in watch.ended:
                continue
            record = await store.find(job_id)
            if record is None:
                continue
            if record.terminal:
                watch.ended[job_id] = record
            if watch.updated.get(job_id) != record.updated_at:
                watch.updated[job_id] = record.updated_at
                watch.last_change[job_id] = now
            idle = now - watch.last_change.setdefault(job_id, now)
            if idle > watch.longest_idle:
                watch.longest_idle, watch.longest_idle_job = idle, f"{job_id[:8]} ({record.state})"
            if record.terminal:
                continue
            if await probe.queue.pending(await probe._stage_ids(record)):  # noqa: SLF001 - the sweeper's own view
                watch.orphan_since.pop(job_id, None)
            else:
                since = watch.orphan_since.setdefault(job_id, now)
                watch.longest_orphan = max(watch.longest_orphan, now - since)
    finally:
        await redis.aclose()


async def submit_all(chaos: Chaos, inputs: list[Path], options: TranscribeOptions, orphans: int) -> list[tuple[str, str]]:
    """What ``vtp submit --no-reuse`` does (in process: the CLI offers no ``noop`` engine);
    ``orphans`` of the submits die between the record and the enqueue. (job id, input name) pairs."""
    from app.storage import open_storage
    from app.submit import submit_file

    settings = Settings.from_env(chaos.env)
    redis = await connect(settings)
    store = JobStore(redis, where=chaos.url)
    storage = open_storage(settings.storage_url)

    async def enqueue(record: JobRecord) -> None:
        await enqueue_first_stage(redis, record, settings=settings)

    async def die_before_enqueue(record: JobRecord) -> None:
        """A submitter killed between writing the record and enqueueing: only the sweeper moves it."""

    step = len(inputs) // orphans if orphans else 0
    try:
        return [
            ((await submit_file(
                store, storage, die_before_enqueue if step and i % step == step // 2 else enqueue,
                path, options, basename=path.stem, reuse=False,
            )).record.id, path.stem)
            for i, path in enumerate(inputs)
        ]
    finally:
        await redis.aclose()


# -- the run --------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--max-minutes", type=float, default=20.0, help="length of the longest input")
    p.add_argument("--engine", choices=["noop", "ctranslate2"], default="noop")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kill-every", default="5,20", help="seconds between worker kills: MIN,MAX")
    p.add_argument("--redis-kills", type=int, default=2)
    p.add_argument("--orphans", type=int, default=2, help="submits that die between the record and the enqueue")
    p.add_argument("--copies", type=int, default=1, help="submit every input this many times (more work under the same faults)")
    p.add_argument("--lease", type=float, default=10.0, help="VTP_LEASE for the workers")
    p.add_argument("--sweep-interval", type=float, default=10.0, help="VTP_SWEEP_INTERVAL for the workers")
    p.add_argument("--tries", type=int, default=6, help="VTP_JOB_TRIES: kills every few seconds use tries up")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for every job to end; what has not is lost")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--write", type=Path, default=None, help="record the result in this markdown file")
    p.add_argument("--section", default="chaos", help="section name in --write (one per configuration)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    kill_min, kill_max = (float(x) for x in args.kill_every.split(","))

    work = Path(tempfile.mkdtemp(prefix="vtp-chaos-"))
    options = TranscribeOptions(engine=args.engine, batch_size=args.batch_size)
    if args.engine == "noop":
        options = TranscribeOptions(engine="noop", model="noop", batch_size=args.batch_size)
    print(f"building {args.jobs} inputs up to {args.max_minutes:g} min in {work} ...", flush=True)
    inputs = build_inputs(work, args.jobs, args.max_minutes * 60)
    audio_seconds = sum(float(p.stem.split("-")[1][:-1]) for p in inputs)
    print(f"{audio_seconds / 60:.0f} min of audio; local reference runs ...", flush=True)
    t = time.monotonic()
    refs = local_references(inputs, options, work / "reference")
    local_wall = time.monotonic() - t

    env = {
        "VTP_LEASE": f"{args.lease:g}", "VTP_SWEEP_INTERVAL": f"{args.sweep_interval:g}",
        "VTP_JOB_TRIES": str(args.tries), "VTP_RETRY_DELAY": "1", "VTP_BATCH_SIZE": str(args.batch_size),
        "VTP_CPU_TIMEOUT": "900", "VTP_TRANSCRIBE_TIMEOUT": "120",
    }
    chaos = Chaos(work, env)
    settings = Settings.from_env({**env, "REDIS_URL": chaos.url})
    names = ["cpu-1", "cpu-2", "gpu-1", "gpu-2"]
    watch = Watch()
    worker_kills = redis_kills = 0
    try:
        chaos.start_redis()
        for name in names:
            chaos.start_worker(name)
        time.sleep(3)
        submitted = anyio.run(submit_all, chaos, inputs * args.copies, options, args.orphans)
        job_ids = [job_id for job_id, _ in submitted]
        names_of = dict(submitted)
        chaos.t0 = started = time.monotonic()
        chaos.note(f"submitted {len(job_ids)} jobs")
        next_kill = started + rng.uniform(kill_min, kill_max)
        # Redis dies right after each of the first worker kills: early, with every stage busy.
        redis_after = {1 + i for i in range(args.redis_kills)}
        while len(watch.ended) < len(job_ids) and time.monotonic() - started < args.timeout:
            try:
                anyio.run(observe, chaos, job_ids, watch, settings)
            except Exception as exc:  # noqa: BLE001 - Redis is down right now: look again soon
                chaos.note(f"(observer: {type(exc).__name__})")
            if time.monotonic() >= next_kill and len(watch.ended) < len(job_ids):
                victim = rng.choice(names)
                chaos.kill_worker(victim)
                chaos.start_worker(victim)
                worker_kills += 1
                chaos.note(f"SIGKILL {victim}, restarted ({len(watch.ended)}/{len(job_ids)} ended)")
                if worker_kills in redis_after and redis_kills < args.redis_kills:
                    chaos.kill_redis()
                    chaos.note("SIGKILL redis-server")
                    time.sleep(3)
                    chaos.start_redis()
                    redis_kills += 1
                    chaos.note("redis-server restarted from its append-only file")
                next_kill = time.monotonic() + rng.uniform(kill_min, kill_max)
            time.sleep(0.5)
        wall = time.monotonic() - started
        chaos.note(f"{len(watch.ended)}/{len(job_ids)} ended after {wall:.0f} s")
        result = anyio.run(summarize, chaos, job_ids, names_of, refs, watch, args.batch_size)
    finally:
        chaos.close()
    started_ids = STARTED.findall(chaos.logs())  # arq logs "→ <arq id>:<function>(" at every start
    starts, distinct = len(started_ids), len(set(started_ids))
    result.update(
        wall=wall, worker_kills=worker_kills, redis_kills=redis_kills, starts=starts, distinct=distinct,
        audio_minutes=audio_seconds / 60, local_wall=local_wall,
    )
    print_result(args, result)
    if args.write:
        write_section(args.write, args.section, f"Chaos: {args.engine} engine", render(args, result))
        print(f"wrote section {args.section!r} of {args.write}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


async def summarize(chaos: Chaos, job_ids, names_of, refs, watch: Watch, batch_size: int) -> dict:
    from app.storage import LocalStorage, download_outputs

    store = JobStore.open(chaos.url)
    storage = LocalStorage(chaos.work / "data")
    out = chaos.work / "dag-out"
    done, failed, lost, wrong, twice, redrives = [], [], [], [], 0, 0
    try:
        for job_id in job_ids:
            record = await store.find(job_id)
            runs = await store.runs(job_id)
            if record is not None:  # transcribe completes once per batch
                batches = -(-record.chunks_total // batch_size)
                runs["transcribe"] = runs.get("transcribe", 0) - batches + 1
            twice += sum(n - 1 for n in runs.values() if n > 1)
            redrives += sum((await store.redrives(job_id)).values())
            if record is None or not record.terminal:
                lost.append(f"{names_of[job_id]} ({record.state if record else 'no record'})")
                continue
            if record.state != "done":
                failed.append(f"{names_of[job_id]}: {record.error}")
                continue
            done.append(job_id)
            await download_outputs(storage, record.outputs, out / job_id, names_of[job_id])
            if view(out / job_id, names_of[job_id]) != refs[names_of[job_id]]:
                wrong.append(names_of[job_id])
    finally:
        await store.aclose()
    return {
        "jobs": len(job_ids), "done": len(done), "failed": failed, "lost": lost, "wrong": wrong,
        "completed_twice": twice, "redrives": redrives,
        "longest_idle": watch.longest_idle, "longest_idle_job": watch.longest_idle_job,
        "longest_orphan": watch.longest_orphan, "events": chaos.events,
    }


def print_result(args, r: dict) -> None:
    print(render(args, r))


def render(args, r: dict) -> str:
    reruns = r["starts"] - r["distinct"]
    rows = [
        ("jobs (audio)", f"{r['jobs']} ({r['audio_minutes'] * args.copies:.0f} min, 8 s to {args.max_minutes:g} min each)"),
        ("faults", f"{r['worker_kills']} worker SIGKILLs (every {args.kill_every.replace(',', '–')} s), "
                   f"{r['redis_kills']} Redis SIGKILLs + restart from the append-only file, "
                   f"{args.orphans} submits dead before their enqueue"),
        ("done", str(r["done"])),
        ("failed", str(len(r["failed"])) + ("".join(f"<br>{f}" for f in r["failed"]) if r["failed"] else "")),
        ("**lost** (not ended)", str(len(r["lost"])) + (f": {', '.join(r['lost'])}" if r["lost"] else "")),
        ("outputs differing from the local run", str(len(r["wrong"])) + (f": {', '.join(r['wrong'])}" if r["wrong"] else "")),
        ("stage reruns (stage jobs started again)", f"{reruns} of {r['distinct']} stage jobs"),
        ("stages that completed twice (their work redone; the fan-in still counts each batch once)", str(r["completed_twice"])),
        ("sweeper re-drives", str(r["redrives"])),
        ("longest time a job's record did not change", f"{r['longest_idle']:.0f} s ({r['longest_idle_job']})"),
        ("longest time a job had no stage queued or running", f"{r['longest_orphan']:.0f} s"),
        ("wall, all jobs under chaos (the local runner on each distinct input once, undisturbed)",
         f"{r['wall']:.0f} s ({r['local_wall']:.0f} s)"),
    ]
    lines = [
        f"`python -m bench.chaos --jobs {args.jobs} --copies {args.copies} --max-minutes {args.max_minutes:g} --engine {args.engine} "
        f"--kill-every {args.kill_every} --redis-kills {args.redis_kills} --orphans {args.orphans} --lease {args.lease:g} "
        f"--sweep-interval {args.sweep_interval:g} --tries {args.tries}` on {machine()}; "
        "2 CPU + 2 GPU-queue workers and Redis on the same cores.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
