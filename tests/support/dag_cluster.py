"""Test helper (not a test module): real ``vtp worker`` subprocesses on a private Redis.

Workers run exactly as in production, ``python -m app.cli worker --queue ...``, with
REDIS_URL/VTP_DATA_DIR pointing at the test's private redis-server and tmp dir. Every
process started here is killed in ``Cluster.close()``, which the fixtures call at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app import constants

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on now (for private redis-servers and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

#: Settings the workers and the CLI share in tests: several batches per file, quick retries,
#: short leases (a killed worker's stage reruns within 5 s) and a sweep every 2 s.
BASE_ENV = {
    "VTP_BATCH_SIZE": "1",
    "VTP_JOB_TRIES": "3",
    "VTP_RETRY_DELAY": "0.3",
    "VTP_TRANSCRIBE_TIMEOUT": "30",
    "VTP_CPU_TIMEOUT": "30",
    "VTP_LEASE": "5",
    "VTP_SWEEP_INTERVAL": "2",
}


def clean_environ() -> dict[str, str]:
    """The test process's environment without anything that would point vtp elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VTP_", "AWS_", "REDIS_")) and k not in ("XDG_DATA_HOME",)
    }


@dataclass
class Cluster:
    redis_url: str
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.work_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **clean_environ(),
            **BASE_ENV,
            "REDIS_URL": self.redis_url,
            "VTP_DATA_DIR": str(self.data_dir),
            **self.env,
        }

    # -- processes ----------------------------------------------------------------------

    def start_worker(
        self, queue: str, name: str, *, concurrency: int | None = None, extra_args: tuple[str, ...] = (), **env: str
    ) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "app.cli", "worker", "--queue", queue, "--name", name, *extra_args]
        if concurrency:
            cmd += ["--concurrency", str(concurrency)]
        log = self.work_dir / f"worker-{name}.log"
        self._logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def wait_ready(self, *names_queues: tuple[str, str], timeout: float = 60) -> None:
        """Until each worker has written its health key (it is polling its queue by then)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            for name, queue in names_queues:
                key = constants.health_key(queue, name)
                while not client.exists(key):
                    proc = self.procs[name]
                    if proc.poll() is not None:
                        raise AssertionError(f"worker {name} exited with {proc.returncode}:\n{self.logs()}")
                    if time.monotonic() > deadline:
                        raise AssertionError(f"worker {name} not ready after {timeout} s:\n{self.logs()}")
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(15)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def starts(self, arq_id: str, worker: str | None = None) -> int:
        """How often an arq job was started (arq logs ``→ <job id>:<function>(`` at each start),
        by every worker or by one."""
        text = self.logs() if worker is None else (self.work_dir / f"worker-{worker}.log").read_text()
        return text.count(f"→ {arq_id}:")

    def logs(self) -> str:
        parts = []
        for name, path in self._logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"---- {name} ----\n{text[-6000:]}")
        return "\n".join(parts)

    # -- the CLI ------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *files: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
        """``vtp submit`` without --wait: the job ids it printed."""
        res = self.cli("submit", "-q", *extra, *map(str, files))
        assert res.returncode == 0, f"submit failed: {res.stderr}\n{self.logs()}"
        return res.stdout.split()


def transcript_view(out_dir: Path, basename: str) -> dict:
    """What must not change between runs: the text outputs and the JSON's segments."""
    doc = json.loads((out_dir / f"{basename}.json").read_text())
    return {
        "txt": (out_dir / f"{basename}.txt").read_text(),
        "srt": (out_dir / f"{basename}.srt").read_text(),
        "vtt": (out_dir / f"{basename}.vtt").read_text(),
        "segments": doc["segments"],
        "language": doc["language"],
    }


_REFERENCE: dict[str, dict] = {}


def local_reference(engines, source: Path, out_dir: Path) -> dict:
    """``transcript_view`` of an undisturbed local run of ``source`` (the runner ``vtp
    transcribe`` uses), with the workers' batch size; computed once per test session."""
    if source.name not in _REFERENCE:
        import anyio

        from app.config import Settings
        from app.messages import TranscribeOptions
        from workers.local_runner import LocalRunner

        runner = LocalRunner(Settings.from_env({}), engines=engines)
        options = TranscribeOptions(batch_size=int(BASE_ENV["VTP_BATCH_SIZE"]))
        anyio.run(runner.run, source, options, out_dir)
        _REFERENCE[source.name] = transcript_view(out_dir, source.stem)
    return _REFERENCE[source.name]


async def wait_until(predicate, timeout: float, what: str, cluster: Cluster, *, every: float = 0.02):
    """Poll ``predicate`` (async) until it returns something true; its value, or AssertionError
    with every worker's log after ``timeout`` seconds."""
    import anyio

    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")
        await anyio.sleep(every)
    return value
