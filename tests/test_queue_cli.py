"""`vtp status` and `vtp worker --check` against a real redis-server: the small holes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis as redis_sync

from app import constants
from app.jobs import JobStore
from app.messages import JobRecord
from tests.support.dag_cluster import ROOT, clean_environ

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def vtp(redis_url: str, *args: str, shell_tail: str = "") -> subprocess.CompletedProcess:
    env = {**clean_environ(), "REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "app.cli", *args]
    if shell_tail:
        cmd = ["sh", "-c", " ".join(f"'{c}'" for c in cmd) + " | " + shell_tail]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


async def make_jobs(redis_url: str, n: int) -> list[str]:
    store = JobStore.open(redis_url)
    try:
        for i in range(n):
            await store.create(JobRecord(id=f"job{i:04d}", input_name=f"talk {i}.mp4"))
    finally:
        await store.aclose()
    return [f"job{i:04d}" for i in range(n)]


async def test_status_skips_expired_records(redis_url):
    ids = await make_jobs(redis_url, 3)
    client = redis_sync.Redis.from_url(redis_url)
    client.delete(constants.job_key(ids[1]))  # what its TTL does once it has ended
    client.close()
    res = vtp(redis_url, "status")
    assert res.returncode == 0 and res.stderr == ""
    assert [line.split()[0] for line in res.stdout.splitlines()] == [ids[2], ids[0]]
    named = vtp(redis_url, "status", ids[1])  # asked for by id: it says so
    assert named.returncode == 1 and "has expired" in named.stderr


async def test_status_into_head_ends_quietly(redis_url):
    ids = await make_jobs(redis_url, 400)  # ~100 KB of JSON: more than a pipe holds
    res = vtp(redis_url, "status", "--json", *ids, shell_tail="head -n 1")
    assert res.stdout.count("\n") == 1
    assert res.stderr == "", res.stderr


def test_worker_check_warns_when_redis_may_evict(redis_server_factory):
    server = redis_server_factory()
    quiet = vtp(server.url, "worker", "--queue", "cpu", "--check")
    assert quiet.returncode == 1 and "warning" not in quiet.stderr  # no worker; default noeviction
    client = redis_sync.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    res = vtp(server.url, "worker", "--queue", "cpu", "--check")
    assert "vtp: warning: Redis maxmemory-policy is allkeys-lru" in res.stderr
    assert "noeviction" in res.stderr


async def test_status_says_how_much_speech_produced_no_words(redis_url):
    """A job whose transcript left speech without words says so in `vtp status` and the API."""
    from app.messages import JobView

    record = JobRecord(id="heard0001", input_name="talk.mp4", state="done", unheard_seconds=12.04)
    store = JobStore.open(redis_url)
    try:
        await store.create(record)
    finally:
        await store.aclose()
    res = vtp(redis_url, "status", "heard0001")
    assert res.returncode == 0 and "12.0 s speech unheard" in res.stdout, res.stdout
    assert JobView.of(record).unheard_seconds == 12.04
