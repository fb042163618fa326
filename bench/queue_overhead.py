"""What the distributed DAG costs over the local runner, on one machine.

    python -m bench.queue_overhead [--repeat 3] [--jobs 200] [--in-flight 1,4] [--write docs/benchmarks.md]

Starts a private ``redis-server`` and two local workers (``vtp worker --queue cpu`` and
``--queue gpu``, subprocesses), then measures:

1. **Overhead on a 6-minute file** (built at run time by concatenating shared media with the
   bundled ffmpeg): ``vtp transcribe`` vs ``vtp submit --wait`` as whole commands (each a fresh
   process, as a user runs them), and the pipeline alone: the local runner in this process
   with the model already loaded vs the DAG job's own wall time (record created -> done) with
   warm workers. Median of ``--repeat`` runs after a warm-up; overhead is a percentage of
   the local wall time.
2. **Stage-transition latency**: ``--jobs`` short jobs with the ``noop`` engine (no model time),
   submitted ``--in-flight`` at a time (one pass per value: 1 is the bare latency, more adds
   waiting for a free worker slot); each stage's queue wait (arq's enqueue time -> the task
   starting, ``JobRecord.waits``) over all six hops, p50/p99, and the no-op job's wall.

Both workers and this process share the same CPU cores, as on a single-host deployment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from app import constants
from bench.report import machine, write_section
from tests.support.dag_cluster import free_port
from app.config import Settings
from app.jobs import JobStore
from app.messages import TranscribeOptions
from app.storage import open_storage
from app.submit import submit_file
from workers.runtime.enqueue import connect, enqueue_first_stage
from workers.runtime.worker import POLL_DELAY_S
from workers.audio import ffmpeg_exe
from workers.engines.pool import EnginePool
from workers.local_runner import LocalRunner

DATA = ROOT / "tests" / "data"
NOTE = (
    "The pipeline difference is mostly the six stage transitions (each waits for a worker's next poll of "
    f"its queue, every {POLL_DELAY_S * 1000:.0f} ms) and the job record/event writes; the command "
    "wall favours `submit --wait` because the workers already hold the model, which `vtp transcribe` loads "
    "on every run."
)
HOPS = ("extract", "segment", "transcribe", "merge", "render", "notify")


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True, timeout=600)


def make_six_minutes(dest: Path) -> Path:
    """talk_tts (65 s) five times and jfk (11 s) three times: 358 s of speech, one FLAC."""
    parts = [DATA / "talk_tts.mp4"] * 5 + [DATA / "jfk.flac"] * 3
    inputs = [a for p in parts for a in ("-i", str(p))]
    chain = "".join(f"[{i}:a]aresample=16000,aformat=channel_layouts=mono[a{i}];" for i in range(len(parts)))
    chain += "".join(f"[a{i}]" for i in range(len(parts))) + f"concat=n={len(parts)}:v=0:a=1[out]"
    ffmpeg(*inputs, "-filter_complex", chain, "-map", "[out]", "-c:a", "flac", str(dest))
    return dest


class LocalCluster:
    """A private redis-server and one CPU + one GPU worker, all killed on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))}
        self.env.update(REDIS_URL=self.url, VTP_DATA_DIR=str(work / "data"))

    def __enter__(self) -> LocalCluster:
        redis_bin = shutil.which("redis-server")
        if not redis_bin:
            sys.exit("redis-server is not installed")
        self._spawn([redis_bin, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(self.work)], "redis")
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for queue in ("cpu", "gpu"):
            self._spawn([sys.executable, "-m", "app.cli", "worker", "--queue", queue, "--name", f"bench-{queue}", "-q"], queue)
        import redis

        client = redis.Redis.from_url(self.url)
        for queue in ("cpu", "gpu"):
            while not client.exists(constants.health_key(queue, f"bench-{queue}")):
                time.sleep(0.05)
        client.close()
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = (self.work / f"{name}.log").open("ab")
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def vtp(self, *args: str) -> float:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=self.env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"vtp {' '.join(args)} failed: {res.stderr}")
        return wall


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def overhead(local: float, dag: float) -> str:
    return f"{100 * (dag - local) / local:+.1f}%"


async def dag_job_walls(cluster: LocalCluster, path: Path, options: TranscribeOptions, repeat: int) -> list[float]:
    """Submit ``path`` ``repeat`` times (after a warm-up), one at a time; each job's record wall."""
    settings = Settings.from_env(cluster.env)
    redis = await connect(settings)
    store = JobStore(redis, where=cluster.url)
    storage = open_storage(settings.storage_url)

    async def enqueue(record):
        await enqueue_first_stage(redis, record, settings=settings)

    walls = []
    try:
        for i in range(repeat + 1):
            sub = await submit_file(store, storage, enqueue, path, options, basename=f"run{i}", reuse=False)
            record = await store.wait(sub.record.id)
            assert record.state == "done", record.error
            if i:
                walls.append(record.wall_seconds)
    finally:
        await redis.aclose()
    return walls


async def noop_latencies(cluster: LocalCluster, clip: Path, jobs: int, in_flight: int) -> tuple[dict[str, list[float]], list[float]]:
    settings = Settings.from_env(cluster.env)
    redis = await connect(settings)
    store = JobStore(redis, where=cluster.url)
    storage = open_storage(settings.storage_url)
    options = TranscribeOptions(engine="noop", model="noop", formats=("json",))
    waits: dict[str, list[float]] = {h: [] for h in HOPS}
    walls: list[float] = []
    limiter = anyio.Semaphore(in_flight)

    async def enqueue(record):
        await enqueue_first_stage(redis, record, settings=settings)

    async def one(i: int) -> None:
        async with limiter:
            sub = await submit_file(store, storage, enqueue, clip, options, basename=f"noop{i}", reuse=False)
            record = await store.wait(sub.record.id)
            assert record.state == "done", record.error
            for hop in HOPS:
                waits[hop].append(record.waits[hop])
            walls.append(record.wall_seconds)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(jobs):
                tg.start_soon(one, i)
    finally:
        await redis.aclose()
    return waits, walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the 6-minute file per system (default 3)")
    ap.add_argument("--jobs", type=int, default=200, help="no-op jobs for the transition latency (default 200)")
    ap.add_argument("--in-flight", default="1,4", help="no-op jobs submitted at a time, one pass per value (default 1,4)")
    ap.add_argument("--write", type=Path, help="replace the queue_overhead section of this markdown file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vtp-queue-bench-"))
    try:
        long_file = make_six_minutes(work / "six_minutes.flac")
        clip = work / "clip.wav"
        ffmpeg("-t", "3", "-i", str(DATA / "jfk.flac"), "-ac", "1", "-ar", "16000", str(clip))
        pcm = subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(long_file), "-f", "s16le", "-ac", "1", "-ar", "16000", "-"],
            capture_output=True, check=True,
        ).stdout
        duration = len(pcm) / 32000
        print(f"6-minute file: {duration:.0f} s of audio; machine: {machine()}", flush=True)
        options = TranscribeOptions()  # the defaults of both commands: batch 8, beam 5, all formats

        # The pipeline alone, in this process, model loaded (in a worker thread, as vtp does).
        engines = EnginePool()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(engines.get, options).result()
        runner = LocalRunner(Settings.from_env({}), engines=engines)
        local_walls = []
        for i in range(args.repeat + 1):
            t0 = time.perf_counter()
            anyio.run(runner.run, long_file, options, work / "local")
            if i:
                local_walls.append(time.perf_counter() - t0)
        del runner, engines
        print(f"local runner, warm model:   {statistics.median(local_walls):6.2f} s", flush=True)

        with LocalCluster(work) as cluster:
            dag_walls = anyio.run(dag_job_walls, cluster, long_file, options, args.repeat)
            print(f"DAG job, warm workers:      {statistics.median(dag_walls):6.2f} s", flush=True)

            cluster.vtp("transcribe", "-q", "-o", str(work / "cli-local"), str(long_file))  # warm the page cache
            cli_local = [cluster.vtp("transcribe", "-q", "-o", str(work / "cli-local"), str(long_file)) for _ in range(args.repeat)]
            print(f"vtp transcribe (command):   {statistics.median(cli_local):6.2f} s", flush=True)
            cli_dag = [
                cluster.vtp("submit", "--wait", "-q", "--no-reuse", "-o", str(work / "cli-dag"), str(long_file))
                for _ in range(args.repeat)
            ]
            print(f"vtp submit --wait (command):{statistics.median(cli_dag):6.2f} s", flush=True)

            passes = {}
            for in_flight in [int(v) for v in args.in_flight.split(",")]:
                t0 = time.perf_counter()
                waits, noop_walls = anyio.run(noop_latencies, cluster, clip, args.jobs, in_flight)
                passes[in_flight] = (waits, noop_walls)
                all_waits = [w for hop in HOPS for w in waits[hop]]
                print(f"{args.jobs} no-op jobs, {in_flight} in flight, in {time.perf_counter() - t0:.1f} s: transition latency "
                      f"p50 {1000 * pct(all_waits, 50):.0f} ms, p99 {1000 * pct(all_waits, 99):.0f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lm, dm = statistics.median(local_walls), statistics.median(dag_walls)
    cl, cd = statistics.median(cli_local), statistics.median(cli_dag)
    table = "\n".join([
        "| what | local | distributed | overhead |",
        "|---|---|---|---|",
        f"| pipeline wall: local runner (model loaded) vs DAG job created -> done (warm workers) | {lm:.2f} s | {dm:.2f} s | {overhead(lm, dm)} |",
        f"| command wall: `vtp transcribe` vs `vtp submit --wait` | {cl:.2f} s | {cd:.2f} s | {overhead(cl, cd)} |",
    ])
    def cell(values: list[float]) -> str:
        return f"{1000 * pct(values, 50):.0f} / {1000 * pct(values, 99):.0f} ms"

    flights = list(passes)
    hop_rows = [
        "| hop: queue wait of | " + " | ".join(f"p50 / p99, {k} in flight" for k in flights) + " |",
        "|---|" + "---|" * len(flights),
    ]
    for hop in HOPS:
        hop_rows.append(f"| {hop} | " + " | ".join(cell(passes[k][0][hop]) for k in flights) + " |")
    hop_rows.append("| **all six hops** | " + " | ".join(
        f"**{cell([w for hop in HOPS for w in passes[k][0][hop]])}**" for k in flights) + " |")
    hop_rows.append("| no-op job, submit -> done | " + " | ".join(cell(passes[k][1]) for k in flights) + " |")
    hops = "\n".join(hop_rows)
    print()
    print(table)
    print()
    print(hops)
    if args.write:
        block = (
            f"Machine: {machine()}; Redis, one CPU worker (concurrency 2) and one GPU-queue worker "
            f"(concurrency 1, on the CPU) on that same machine. Model: bundled tiny.en (CTranslate2 int8), batch 8, beam 5. "
            f"Command: `python -m bench.queue_overhead --write docs/benchmarks.md`.\n\n"
            f"**{duration / 60:.0f}-minute file** ({duration:.0f} s: talk_tts.mp4 x5 + jfk.flac x3, concatenated), "
            f"median of {args.repeat} runs after a warm-up:\n\n{table}\n\n{NOTE}\n\n"
            f"**Stage-transition latency**: {args.jobs} jobs of a 3 s clip with the `noop` engine per column, "
            f"submitted so that 1 (or 4) are in flight; each hop is the time a stage's arq job waited between being enqueued "
            f"and a worker starting it (`JobRecord.waits`; workers poll every {POLL_DELAY_S * 1000:.0f} ms):\n\n"
            f"{hops}"
        )
        write_section(args.write, "queue_overhead", "Distributed DAG: queue overhead", block)


if __name__ == "__main__":
    main()
