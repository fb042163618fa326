"""Batching across jobs: 20 one-minute files submitted together vs one after another, through
real workers (one CPU worker, one GPU-queue worker with the batcher) on a private Redis.

    python -m bench.batching_across_jobs [--files 20] [--seconds 60] [--write docs/benchmarks.md]

Three passes over the same files (each a distinct one-minute cut, so nothing is reused):

* **one after another**: submit a file, wait until it is done, submit the next;
* **together, 1 job at a time on the GPU worker** (``VTP_GPU_JOBS=1``): the queue keeps the
  workers busy (CPU stages overlap the transcription of other files), but each decode batch
  holds one job's chunks;
* **together, batched across jobs** (``VTP_GPU_JOBS=4``, ``VTP_DECODE_BATCH=16``): the
  chunks of up to 4 jobs share each decode batch.

Throughput = audio seconds / wall seconds from the first submit to the last job done. Default
engine: what a GPU worker picks on this machine (``VTP_ENGINE=auto``: CTranslate2 on CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]

from app import constants
from app.config import Settings
from app.jobs import JobStore
from app.messages import TranscribeOptions
from app.storage import open_storage
from app.submit import submit_file
from bench.report import machine, write_section
from tests.support.dag_cluster import free_port
from workers.runtime.enqueue import connect, enqueue_first_stage
from workers.audio import ffmpeg_exe

DATA = ROOT / "tests" / "data"


def make_files(dest: Path, n: int, seconds: float) -> list[Path]:
    """n distinct cuts of ``seconds`` of speech: talk_tts then ivr_prompts, each starting elsewhere."""
    long = dest / "speech.flac"
    inputs = [a for p in ("talk_tts.mp4", "ivr_prompts.mp4", "talk_tts.mp4") for a in ("-i", str(DATA / p))]
    chain = "".join(f"[{i}:a]aresample=16000,aformat=channel_layouts=mono[a{i}];" for i in range(3))
    chain += "[a0][a1][a2]concat=n=3:v=0:a=1[out]"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *inputs, "-filter_complex", chain, "-map", "[out]", str(long)], check=True)
    files = []
    for i in range(n):
        out = dest / f"clip{i:02d}.flac"
        start = (i * 7.3) % 230
        subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-ss", f"{start:.1f}", "-t", str(seconds), "-i", str(long), str(out)], check=True)
        files.append(out)
    return files


class Workers:
    def __init__(self, work: Path, url: str, gpu_env: dict[str, str]) -> None:
        self.work, self.url, self.gpu_env = work, url, gpu_env
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))}
        self.env.update(REDIS_URL=url, VTP_DATA_DIR=str(work / "data"))
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Workers:
        import redis

        for queue, extra in (("cpu", {}), ("gpu", self.gpu_env)):
            log = (self.work / f"{queue}.log").open("ab")
            cmd = [sys.executable, "-m", "app.cli", "worker", "--queue", queue, "--name", f"bench-{queue}", "-q"]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT))
        client = redis.Redis.from_url(self.url)
        for queue in ("cpu", "gpu"):
            while not client.exists(constants.health_key(queue, f"bench-{queue}")):
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stats(self) -> dict[str, str]:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            return {k.decode(): v.decode() for k, v in client.hgetall(constants.gpu_stats_key("bench-gpu")).items()}
        finally:
            client.close()


async def run_pass(env: dict[str, str], files: list[Path], together: bool, tag: str) -> float:
    settings = Settings.from_env(env)
    redis = await connect(settings)
    store = JobStore(redis, where=settings.redis_url)
    storage = open_storage(settings.storage_url)
    options = TranscribeOptions()

    async def enqueue(record):
        await enqueue_first_stage(redis, record, settings=settings)

    async def submit(i: int, path: Path) -> str:
        sub = await submit_file(store, storage, enqueue, path, options, basename=f"{tag}{i}", reuse=False)
        return sub.record.id

    try:
        t0 = time.perf_counter()
        if together:
            ids = [await submit(i, p) for i, p in enumerate(files)]
            records = [await store.wait(j) for j in ids]
        else:
            records = []
            for i, p in enumerate(files):
                records.append(await store.wait(await submit(i, p)))
        wall = time.perf_counter() - t0
    finally:
        await redis.aclose()
    bad = [r.error for r in records if r.state != "done"]
    if bad:
        sys.exit(f"jobs failed: {bad[:3]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    redis_bin = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = make_files(work, args.files, args.seconds)
        audio = args.files * args.seconds
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        server = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            passes = [
                ("one after another", False, {"VTP_GPU_JOBS": "4", "VTP_DECODE_BATCH": "16"}),
                ("together, 1 job at a time on the GPU worker", True, {"VTP_GPU_JOBS": "1", "VTP_DECODE_BATCH": "16"}),
                ("together, batched across jobs (4 jobs, decode batch 16)", True, {"VTP_GPU_JOBS": "4", "VTP_DECODE_BATCH": "16"}),
            ]
            for n, (label, together, gpu_env) in enumerate(passes):
                with Workers(work, url, gpu_env) as workers:
                    anyio.run(run_pass, workers.env, files[:2], True, f"warm{n}-")  # warm-up
                    time.sleep(5.5)  # the next health refresh publishes the batcher's counters
                    before = workers.stats()
                    wall = anyio.run(run_pass, workers.env, files, together, f"p{n}-")
                    time.sleep(5.5)
                    after = workers.stats()
                stats = {k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in ("batches", "chunks", "slots", "shared_batches")}
                rows.append((label, wall, audio / wall, stats))
                print(rows[-1], flush=True)
        finally:
            server.kill()
    base = rows[0][2]
    lines = [
        f"Machine: {machine()} (shared with other jobs while measured). {args.files} files of {args.seconds:.0f} s "
        "(distinct cuts of the test speech), one CPU worker and one GPU-queue worker (engine auto = CTranslate2 int8 on "
        "CPU, tiny.en), fan-out VTP_BATCH_SIZE=8, after a warm-up. Command: `python -m bench.batching_across_jobs --write docs/benchmarks.md`.",
        "",
        "| submitted | wall s | x realtime | throughput vs one after another | decode batches | of them shared by jobs | mean batch | fill ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, wall, x, stats in rows:
        batches, chunks, slots = int(stats["batches"]), int(stats["chunks"]), stats["slots"]
        mean = chunks / batches if batches else 0
        fill = chunks / slots if slots else 0
        lines.append(f"| {label} | {wall:.1f} | {x:.1f}x | {x / base:.2f} | {batches} | {int(stats['shared_batches'])} | {mean:.1f} | {fill:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "batching_across_jobs", "Batching across jobs (GPU worker with the batcher)", table)


if __name__ == "__main__":
    main()
