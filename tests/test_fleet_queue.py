"""What the controller reads from Redis (a real redis-server): queue depth, queued audio, jobs in
progress, live workers; and the figure it serves for KEDA."""

from __future__ import annotations

import pickle

import aiohttp
import pytest

from app import constants
from app.redis_outage import connect
from app.messages import Chunk, ChunkBatch, TranscribeOptions, TranscribeRequest, encode
from tests.support.fly_standin import ROOT  # noqa: F401 - puts tests/ helpers in reach
from tests.support.dag_cluster import free_port
from workers.controller.decide import Policy
from workers.controller.loop import Figures, ReportOnly, serve_figures, tick
from workers.controller.queue import batch_audio_seconds, live_workers, read_queue, read_workers

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def arq_payload(seconds: float, index: int = 0) -> bytes:
    batch = ChunkBatch(index=index, chunks=[Chunk(index=0, start=0.0, end=seconds)], audio_key="k")
    request = TranscribeRequest(job_id="j", batch=batch, options=TranscribeOptions())
    # what arq's serialize_job writes
    return pickle.dumps({"t": None, "f": "transcribe", "a": (encode(request),), "k": {}, "et": 0})


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_payloads_are_read_without_running_code():
    assert batch_audio_seconds(arq_payload(12.5)) == 12.5
    assert batch_audio_seconds(pickle.dumps({"a": (Evil(),)})) == 0.0
    assert batch_audio_seconds(b"garbage") == 0.0


async def test_queue_and_workers(redis_url):
    redis = connect(redis_url)
    try:
        for i, seconds in enumerate((20.0, 25.0, 30.0)):
            await redis.zadd(constants.QUEUE_GPU, {f"j:transcribe:{i}": i})
            await redis.set(constants.ARQ_JOB_PREFIX + f"j:transcribe:{i}", arq_payload(seconds, i))
        await redis.set(constants.ARQ_IN_PROGRESS_PREFIX + "j:transcribe:2", b"1")
        view = await read_queue(redis)
        assert (view.queued, view.queued_audio_s, view.in_progress) == (2, 45.0, 1)
        await redis.set(constants.health_key("gpu", "vtp-gpu-1"), b"Nov-25 j_complete=3 j_failed=0 j_retried=0 j_ongoing=1 queued=2")
        await redis.set(constants.health_key("cpu", "cpu-1"), b"j_ongoing=4")
        workers = await live_workers(redis)
        assert list(workers) == ["vtp-gpu-1"] and workers["vtp-gpu-1"].running == 1
        # a worker that renews a lease while its health key is missing is known, not alive
        await redis.set(constants.holds_key("gpu", "vtp-gpu-2"), b"j:transcribe:2", px=5000)
        await redis.set(constants.holds_key("gpu", "vtp-gpu-1"), b"j:transcribe:0", px=5000)
        workers = await read_workers(redis)
        assert workers["vtp-gpu-2"].alive is False and workers["vtp-gpu-2"].holding == 1
        assert workers["vtp-gpu-1"].alive and (workers["vtp-gpu-1"].running, workers["vtp-gpu-1"].holding) == (1, 1)
        await redis.delete(constants.holds_key("gpu", "vtp-gpu-2"), constants.holds_key("gpu", "vtp-gpu-1"))

        # --backend keda: nothing started, the figure served as JSON
        figures = Figures()
        plan = await tick(ReportOnly(), redis, Policy(max_machines=4, throughput=1.0, drain_target_s=10), figures)
        assert plan.start == figures.wanted == 2  # 45 s of audio at 1 s/s within 10 s, capped by 2 batches
        port = free_port()
        runner = await serve_figures(figures, port, host="127.0.0.1")
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
                doc = await resp.json()
            assert doc["wanted"] == 2 and doc["queued"] == 2 and doc["in_progress"] == 1
        finally:
            await runner.cleanup()
    finally:
        await redis.aclose()
