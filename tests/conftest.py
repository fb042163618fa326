"""Shared fixtures: real media from tests/data, real redis-server processes, the real model.

Redis: each test session starts its own ``redis-server`` on a free port (never the machine's
6379), and every test gets a flushed database. Tests that need to kill or restart Redis use
``redis_server_factory`` for a private one they own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dag_cluster import free_port
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
#: The repository's own test media (sources and licences in its README): a clone works alone.
DATA = ROOT / "tests" / "data"
#: What the suite needs; a missing file *fails* the tests that use it, it never skips them.
MEDIA = ("talk_tts.mp4", "ivr_prompts.mp4", "jfk.flac", "silence.mp4", "no_audio.mp4")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    missing = [name for name in MEDIA if not (DATA / name).is_file()]
    if missing:
        pytest.fail(f"test media missing from {DATA}: {', '.join(missing)}", pytrace=False)
    return DATA


@pytest.fixture
def redis_server_factory(tmp_path_factory) -> Iterator:
    """Start private redis-servers; every one is killed when the test ends."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (apt-get install redis-server; make test provisions it)", pytrace=False)
    servers: list[RedisServer] = []

    def start(*, appendonly: bool = False) -> RedisServer:
        server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"), appendonly)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def redis_session_server(tmp_path_factory) -> Iterator[RedisServer]:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (apt-get install redis-server; make test provisions it)", pytrace=False)
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-session"), appendonly=False)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_session_server) -> str:
    """A flushed database on the session's private redis-server."""
    import redis

    client = redis.Redis.from_url(redis_session_server.url)
    client.flushall()
    client.close()
    return redis_session_server.url


@pytest.fixture
def make_cluster(tmp_path):
    """Clusters of real worker processes (``dag_cluster.Cluster``), closed when the test ends.
    Every cluster's directory has a space in its path: paths must never be split on one."""
    from tests.support.dag_cluster import Cluster

    clusters: list = []

    def make(redis_url: str, **env: str):
        c = Cluster(redis_url, tmp_path / f"cluster {len(clusters)}", env=env)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.close()


@pytest.fixture(scope="session")
def engines():
    """One EnginePool for the session: the bundled model is loaded once, as in a worker."""
    from workers.engines.pool import EnginePool

    return EnginePool()


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are the only ones that may skip: when this machine has no CUDA GPU."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in gpu_items:
            item.add_marker(skip)
