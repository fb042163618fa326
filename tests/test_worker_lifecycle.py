"""When a worker stops: ``--idle-exit`` once its queue drains, and SIGTERM draining its jobs.

Real ``vtp worker`` processes on a private redis-server (tests/support/dag_cluster.py). The GPU worker
is slowed inside ``transcribe`` with the test-only ``VTP_TEST_STAGE_DELAY`` so that a job is
certainly running when the signal arrives or the idle timer would otherwise fire. A GPU worker
with an idle time starts once its batches are queued, as the controller starts one.
"""

from __future__ import annotations

import signal
import subprocess
import time

import anyio
import pytest
import redis as redis_sync

from app import constants
from app.jobs import JobStore
from tests.support.dag_cluster import Cluster, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

#: arq's keys (arq.constants; arq is imported by workers/runtime/ alone).
IN_PROGRESS = "arq:in-progress:"
RETRY = "arq:retry:"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def wait_exit(c: Cluster, name: str, timeout: float) -> int:
    try:
        return c.procs[name].wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {name} still running after {timeout} s\n{c.logs()}") from None


def test_idle_worker_exits_cleanly(redis_url, make_cluster):
    c = make_cluster(redis_url)
    c.start_worker("gpu", "gpu", extra_args=("--idle-exit", "1.5"))
    c.wait_ready(("gpu", "gpu"))
    ready = time.monotonic()
    assert wait_exit(c, "gpu", 20) == 0, c.logs()
    assert time.monotonic() - ready >= 1.0  # it waited out the idle time (from its first poll)
    probe = redis_sync.Redis.from_url(redis_url)
    try:  # it said goodbye: no stale health key left for the health check to trust
        assert not probe.exists(constants.health_key("gpu", "gpu"))
    finally:
        probe.close()
    assert "idle for" in c.logs()


async def test_idle_exit_waits_for_running_and_queued_work(redis_url, make_cluster, data_dir):
    """A job that runs longer than the idle time keeps the worker; it exits once all is done."""
    c = make_cluster(redis_url)
    c.start_worker("cpu", "cpu")
    c.wait_ready(("cpu", "cpu"))
    store = JobStore.open(redis_url)
    try:
        # The GPU worker starts once the batches wait in its queue, as a controller starts one:
        # started before, it would rightly leave if the CPU stages took longer than its idle
        # time (they do on a busy 2-core machine, which is how this test once hung).
        (job_id,) = c.submit(data_dir / "talk_tts.mp4")  # 3 batches of 3 s each at least

        async def queued():
            return await store.redis.zcard(constants.QUEUE_GPU) == 3

        await wait_until(queued, 60, "the 3 batches to be queued", c)
        c.start_worker("gpu", "gpu", VTP_IDLE_EXIT="2", VTP_TEST_STAGE_DELAY="transcribe:3")
        with anyio.move_on_after(120) as waited:
            record = await store.wait(job_id)
        if waited.cancelled_caught:
            raise AssertionError(f"job {job_id} not done after 120 s\n{c.logs()}")
        done_at = time.monotonic()
        if c.procs["gpu"].poll() is not None:
            raise AssertionError(f"the GPU worker left before the job was done\n{c.logs()}")
        assert record.state == "done", record.error
        assert await store.runs(job_id) == {
            "extract": 1, "segment": 1, "transcribe": 3, "merge": 1, "render": 1, "notify": 1,
        }
    finally:
        await store.aclose()
    assert wait_exit(c, "gpu", 20) == 0, c.logs()
    assert time.monotonic() - done_at < 15
    assert "idle for" in c.logs()
    assert c.procs["cpu"].poll() is None  # VTP_IDLE_EXIT unset: the CPU worker stays


async def test_sigterm_finishes_the_running_batch_without_using_a_try(redis_url, make_cluster, data_dir):
    c = make_cluster(redis_url)
    c.start_worker("cpu", "cpu")
    c.start_worker("gpu", "gpu", VTP_TEST_STAGE_DELAY="transcribe:2")
    c.wait_ready(("cpu", "cpu"), ("gpu", "gpu"))
    store = JobStore.open(redis_url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")  # one batch
        batch = constants.arq_job_id(job_id, "transcribe", 0)

        async def running():
            return await store.redis.exists(IN_PROGRESS + batch)

        await wait_until(running, 60, "the batch to start", c)
        c.procs["gpu"].send_signal(signal.SIGTERM)
        assert wait_exit(c, "gpu", 30) == 0, c.logs()
        # it finished the batch before leaving: the job completes with no GPU worker left
        record = await store.wait(job_id)
        assert record.state == "done", record.error
        assert await store.runs(job_id) == {
            "extract": 1, "segment": 1, "transcribe": 1, "merge": 1, "render": 1, "notify": 1,
        }
        assert int(await store.redis.get(RETRY + batch) or 0) <= 1
        assert "taking no more jobs" in c.logs()
    finally:
        await store.aclose()


async def test_second_sigterm_stops_now_and_hands_the_try_back(redis_url, make_cluster, data_dir):
    c = make_cluster(redis_url)
    c.start_worker("cpu", "cpu")
    c.start_worker("gpu", "gpu-1", VTP_TEST_STAGE_DELAY="transcribe:20")
    c.wait_ready(("cpu", "cpu"), ("gpu-1", "gpu"))
    store = JobStore.open(redis_url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")
        batch = constants.arq_job_id(job_id, "transcribe", 0)

        async def running():
            return await store.redis.exists(IN_PROGRESS + batch)

        await wait_until(running, 60, "the batch to start", c)
        c.procs["gpu-1"].send_signal(signal.SIGTERM)
        await anyio.sleep(0.3)
        c.procs["gpu-1"].send_signal(signal.SIGTERM)
        assert wait_exit(c, "gpu-1", 15) == 0, c.logs()
        # queued again, not running, and its try handed back
        assert await store.redis.zscore(constants.QUEUE_GPU, batch) is not None
        assert not await store.redis.exists(IN_PROGRESS + batch)
        assert int(await store.redis.get(RETRY + batch) or 0) == 0

        c.start_worker("gpu", "gpu-2")
        record = await store.wait(job_id)
        assert record.state == "done", record.error
        assert " try=" not in (c.work_dir / "worker-gpu-2.log").read_text()  # its first try, again
    finally:
        await store.aclose()
