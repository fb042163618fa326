"""The GPU worker as it runs in production (a real ``vtp worker --queue gpu`` process on a private
Redis), on CPU: its own hardware settings, its model loaded before it takes work and named in its
health key, the model allow-list, and several jobs' chunks sharing its decode batches."""

from __future__ import annotations

import shutil

import anyio
import pytest
import redis as redis_sync

from app import constants
from app.config import Settings
from app.jobs import JobStore
from app.messages import TranscribeOptions
from tests.support.dag_cluster import Cluster
from workers.gpu_worker import GpuEngines, Hardware

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def cluster(redis_url, tmp_path):
    c = Cluster(redis_url, tmp_path / "cluster", env={"VTP_GPU_JOBS": "4", "VTP_DECODE_BATCH": "8", "VTP_BATCH_WAIT_MS": "300"})
    yield c
    c.close()


def test_worker_settings_override_what_a_job_carries():
    settings = Settings.from_env({"VTP_DEVICE": "cpu", "VTP_ENGINE": "ctranslate2", "VTP_MODELS": "tiny.en, /models/x"})
    engines = GpuEngines(settings)
    assert engines.hardware == Hardware("ctranslate2", "cpu", "int8")
    job = TranscribeOptions(engine="transformers", device="cuda", compute_type="float16", beam_size=2)
    resolved = engines.options_for(job)
    assert (resolved.engine, resolved.device, resolved.compute_type, resolved.beam_size) == ("ctranslate2", "cpu", "int8", 2)
    assert engines.options_for(TranscribeOptions(model="/models/x")).model == "/models/x"
    # the default model name means "whatever this worker serves first"
    other = GpuEngines(Settings.from_env({"VTP_DEVICE": "cpu", "VTP_MODELS": "/models/x"}))
    assert other.options_for(TranscribeOptions()).model == "/models/x"
    with pytest.raises(Exception, match="not served by the GPU workers"):
        engines.options_for(TranscribeOptions(model="large-v3"))
    assert Hardware.from_settings(Settings.from_env({"VTP_DEVICE": "cpu", "VTP_ENGINE": "transformers"})).compute_type == "float32"


async def test_gpu_worker_batches_across_jobs_and_reports_its_model(cluster, redis_url, data_dir, tmp_path):
    cluster.start_worker("cpu", "cpu")
    cluster.start_worker("gpu", "gpu")
    cluster.wait_ready(("cpu", "cpu"), ("gpu", "gpu"))  # its health key exists only once the model is loaded
    probe = redis_sync.Redis.from_url(redis_url)
    try:
        health = probe.get(constants.health_key("gpu", "gpu")).decode()
        assert "models=tiny.en engine=ctranslate2 device=cpu compute_type=int8" in health
        res = cluster.cli("worker", "--queue", "gpu", "--check", "--name", "gpu")
        assert res.returncode == 0 and "models=tiny.en" in res.stdout
    finally:
        probe.close()

    inputs = []
    for i in range(3):
        copy = tmp_path / f"in{i}.mp4"
        shutil.copyfile(data_dir / "talk_tts.mp4", copy)
        inputs.append(copy)
    job_ids = cluster.submit(*inputs, extra=("--no-reuse",))
    wrong = cluster.submit(data_dir / "jfk.flac", extra=("--model", "small.en", "--no-reuse"))
    store = JobStore.open(redis_url)
    try:
        with anyio.fail_after(120):
            records = [await store.wait(j) for j in job_ids]
            refused = await store.wait(wrong[0])
    finally:
        await store.aclose()
    assert [r.state for r in records] == ["done"] * 3, [r.error for r in records]
    assert refused.state == "failed" and "not served by the GPU workers" in refused.error

    await anyio.sleep(5.5)  # the next health refresh publishes the counters
    probe = redis_sync.Redis.from_url(redis_url)
    try:
        stats = {k.decode(): v.decode() for k, v in probe.hgetall(constants.gpu_stats_key("gpu")).items()}
    finally:
        probe.close()
    assert int(stats["chunks"]) == sum(r.chunks_total for r in records) == 9
    assert int(stats["batches"]) < 9  # fewer model calls than transcribe jobs (VTP_BATCH_SIZE=1)
    assert int(stats["shared_batches"]) >= 1
    assert 0 < float(stats["fill_ratio"]) <= 1 and stats["decode_batch"] == "8" and stats["models"] == "tiny.en"
