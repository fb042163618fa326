"""Load on the web process: many concurrent uploads, their latency, and the server's memory.

    python -m bench.upload_load [--uploads 200] [--concurrency 200] [--sizes 0.5,5,0.5x50,50x50] [--write docs/benchmarks.md]

Starts a private ``redis-server`` and one ``vtp web`` process (both on 127.0.0.1, no workers:
the jobs stay queued, only the web side is measured), then for each file size sends
``--uploads`` multipart ``POST /v1/jobs`` of a real video, ``--concurrency`` at a time, and
reports (one fresh web process per size) p50/p99 latency of the request (first byte sent -> 202 read), errors (anything but
202), and the web process's resident memory: its RSS before the pass and its peak during it
(``VmHWM`` reset per pass through ``/proc/<pid>/clear_refs``; sampled ``VmRSS`` where that is
not allowed). Sizes above the shared test video are built at run time by looping it with the
bundled ffmpeg (``-stream_loop``, stream copy): same content, more bytes, longer media.

Loopback only and bounded: every request has a timeout, every process started here is killed
at the end, and the data directory is a temporary one that is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]

from bench.report import machine, write_section
from tests.support.dag_cluster import free_port

SOURCE = ROOT / "tests" / "data" / "talk_tts.mp4"
TOKEN = "bench-token-0123456789abcdef"


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start on port {port}")


def build_media(size_mb: float, work: Path) -> Path:
    """The test video looped until it is about ``size_mb`` megabytes (stream copy, no re-encode)."""
    from app.media import ffmpeg_exe

    base = SOURCE.stat().st_size
    loops = max(round(size_mb * 1e6 / base), 1)
    if loops == 1:
        return SOURCE
    out = work / f"talk_x{loops}.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", str(loops - 1), "-i", str(SOURCE), "-c", "copy", str(out)],
        check=True, timeout=300,
    )
    return out


class Memory:
    """Peak RSS of a process while a pass runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status = Path(f"/proc/{pid}/status")
        self._stop = threading.Event()
        self.sampled_peak = 0

    def field(self, name: str) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> int:
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        before = self.field("VmRSS")
        self.sampled_peak = before
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return before

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.sampled_peak = max(self.sampled_peak, self.field("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.sampled_peak, self.field("VmHWM") if self.hwm_reset else 0)


async def one_upload(session: aiohttp.ClientSession, url: str, path: Path, n: int) -> tuple[float, int, str]:
    data = aiohttp.FormData()
    data.add_field("formats", "txt")
    data.add_field("idempotency_key", f"bench-{os.getpid()}-{time.time_ns()}-{n}")
    started = time.perf_counter()
    with path.open("rb") as f:
        data.add_field("file", f, filename=path.name, content_type="video/mp4")
        try:
            async with session.post(url, data=data, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                body = await resp.read()
                return time.perf_counter() - started, resp.status, "" if resp.status == 202 else body[:200].decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}"


async def one_pass(base: str, path: Path, uploads: int, concurrency: int) -> tuple[list[float], list[str], float]:
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def bounded(n: int):
            async with limit:
                return await one_upload(session, f"{base}/v1/jobs", path, n)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(n) for n in range(uploads)))
        wall = time.perf_counter() - started
    latencies = [r[0] for r in results if r[1] == 202]
    errors = [f"{r[1]} {r[2]}" for r in results if r[1] != 202]
    return latencies, errors, wall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, default=200, help="uploads per file size (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=200, help="uploads in flight at once (default: %(default)s)")
    ap.add_argument(
        "--sizes", default="0.5,5,0.5x50,50x50",
        help="file sizes in MB, each SIZE or SIZExUPLOADS (default: %(default)s: 50 MB files 50 at a time bound disk use)",
    )
    ap.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = ap.parse_args()
    if not 1 <= args.uploads <= 1000 or not 1 <= args.concurrency <= 1000:
        raise SystemExit("--uploads and --concurrency must be within 1..1000")
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed")

    work = Path(tempfile.mkdtemp(prefix="vtp-upload-bench-"))
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(redis)
        wait_port(redis_port, redis, "redis-server")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("VTP_", "REDIS_"))},
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "VTP_DATA_DIR": str(work / "data"),
            "VTP_API_TOKENS": TOKEN,
            "VTP_MAX_UPLOAD_MB": "1024",
            "TMPDIR": str(work),
        }
        for item in (s.strip() for s in args.sizes.split(",") if s.strip()):
            size_text, _, count = item.partition("x")
            size = float(size_text)
            path = build_media(size, work)
            uploads = min(int(count), 1000) if count else args.uploads
            # A fresh web process per size: each pass starts from the same baseline RSS.
            web_port = free_port()
            with (work / "web.log").open("ab") as log:
                web = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "web", "--port", str(web_port)],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            procs.append(web)
            wait_port(web_port, web, "vtp web")
            base = f"http://127.0.0.1:{web_port}"
            mem = Memory(web.pid)
            asyncio.run(one_pass(base, SOURCE, 5, 5))  # warm-up: imports, first connections, first ffmpeg
            in_flight = min(args.concurrency, uploads)
            before = mem.start()
            latencies, errors, wall = asyncio.run(one_pass(base, path, uploads, in_flight))
            peak = mem.stop()
            web.send_signal(signal.SIGTERM)
            web.wait(10)
            mb = path.stat().st_size / 1e6
            row = {
                "size": mb, "uploads": uploads, "concurrency": in_flight, "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99), "errors": len(errors), "wall": wall, "rss0": before / 2**20, "peak": peak / 2**20,
            }
            rows.append(row)
            print(
                f"{mb:7.1f} MB x {uploads} ({in_flight} in flight): p50 {row['p50']:.2f} s, p99 {row['p99']:.2f} s, "
                f"errors {len(errors)}, {uploads / wall:.1f} uploads/s, RSS {row['rss0']:.0f} -> peak {row['peak']:.0f} MiB",
                flush=True,
            )
            for e in errors[:5]:
                print("   error:", e, flush=True)
            shutil.rmtree(work / "data" / "jobs", ignore_errors=True)  # bound disk use between passes
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    if args.write and rows:
        lines = [
            f"Machine: {machine()}; redis-server and one `vtp web` process on that machine, no workers (jobs stay "
            f"queued: only the web side is measured). Each upload is a multipart `POST /v1/jobs` of the test video "
            f"(larger sizes: the same video looped, stream copy). Command: `python -m bench.upload_load --write {args.write}`.",
            "",
            "| file MB | uploads | in flight | p50 s | p99 s | errors | uploads/s | web RSS before MiB | web RSS peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['size']:.1f} | {r['uploads']} | {r['concurrency']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} "
                f"| {r['uploads'] / r['wall']:.1f} | {r['rss0']:.0f} | {r['peak']:.0f} |"
            )
        write_section(args.write, "upload_load", "Web process: concurrent uploads", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
