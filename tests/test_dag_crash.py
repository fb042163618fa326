"""The DAG under failure: workers SIGKILLed mid-stage, Redis killed and restarted, a burst of jobs.

Every test starts its own redis-server and worker subprocesses and kills them all at teardown.
To kill a worker *inside* a stage without relying on timing luck, the victim runs with the
test-only ``VTP_TEST_STAGE_DELAY`` (it sleeps inside the stage) and is killed once arq's
in-progress key for that stage exists. A killed worker's job is rerun by arq when that key
expires: it is the worker's lease (``VTP_LEASE``, 5 s here), renewed while the worker lives.
"""

from __future__ import annotations

import shutil
import time

import anyio
import pytest
import redis as redis_sync

from app import constants
from app.jobs import JobStore
from tests.support.dag_cluster import Cluster, local_reference, transcript_view, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(200)]

#: arq's key for a started job (arq.constants.in_progress_key_prefix; arq is imported by
#: workers/runtime/ alone).
IN_PROGRESS = "arq:in-progress:"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engines, data_dir):
    """Transcripts of undisturbed local runs, to compare the DAG's outputs with."""
    out = tmp_path_factory.mktemp("reference")
    return {name: local_reference(engines, data_dir / name, out) for name in ("jfk.flac", "talk_tts.mp4")}


async def finish_all(store: JobStore, job_ids: list[str], cluster: Cluster, timeout: float = 120) -> dict:
    records = {}
    try:
        with anyio.fail_after(timeout):
            for job_id in job_ids:
                records[job_id] = await store.wait(job_id)
    except TimeoutError:
        raise AssertionError(f"jobs did not finish: {records}\n{cluster.logs()}") from None
    return records


async def test_gpu_worker_killed_mid_batch(redis_server_factory, make_cluster, reference, data_dir, tmp_path):
    server = redis_server_factory()
    c = make_cluster(server.url)
    c.start_worker("cpu", "cpu")
    c.start_worker("gpu", "gpu-victim", VTP_TEST_STAGE_DELAY="transcribe:2")
    c.wait_ready(("cpu", "cpu"), ("gpu-victim", "gpu"))
    store = JobStore.open(server.url)
    try:
        (job_id,) = c.submit(data_dir / "talk_tts.mp4")
        second = constants.arq_job_id(job_id, "transcribe", 1)

        async def mid_second_batch():  # batch 0 is in, batch 1 is running on the victim
            record = await store.get(job_id)
            return (
                record.chunks_done == 1
                and await store.redis.exists(IN_PROGRESS + second)
                # inside the stage, not just claimed: arq logs the start after the claim
                and c.starts(second, "gpu-victim") == 1
            )

        await wait_until(mid_second_batch, 60, "the victim to start batch 1", c)
        c.kill("gpu-victim")
        killed_at = time.monotonic()
        c.start_worker("gpu", "gpu-rescuer")

        record = (await finish_all(store, [job_id], c))[job_id]
        assert record.state == "done", record.error
        # batch 1 waited for the victim's lease to run out, then ran again on the rescuer
        assert time.monotonic() - killed_at > 2
        assert c.starts(second) == 2 and c.starts(second, "gpu-rescuer") == 1
        assert record.chunks_done == record.chunks_total == 3
        assert await store.runs(job_id) == {
            "extract": 1, "segment": 1, "transcribe": 3, "merge": 1, "render": 1, "notify": 1,
        }
        res = c.cli("submit", "--wait", "-q", "-o", str(tmp_path / "out"), str(data_dir / "talk_tts.mp4"))
        assert res.returncode == 0, res.stderr  # the same media again: returns the finished job's outputs
        # nothing lost, nothing doubled
        assert transcript_view(tmp_path / "out", "talk_tts") == reference["talk_tts.mp4"]
    finally:
        await store.aclose()


async def test_cpu_worker_killed_mid_extract(redis_server_factory, make_cluster, reference, data_dir, tmp_path):
    server = redis_server_factory()
    c = make_cluster(server.url)
    c.start_worker("cpu", "cpu-victim", VTP_TEST_STAGE_DELAY="extract:3")
    c.start_worker("gpu", "gpu")
    c.wait_ready(("cpu-victim", "cpu"), ("gpu", "gpu"))
    store = JobStore.open(server.url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")
        extract = constants.arq_job_id(job_id, "extract")

        async def mid_extract():
            record = await store.get(job_id)
            return record.state == "extracting" and await store.redis.exists(IN_PROGRESS + extract)

        await wait_until(mid_extract, 30, "the victim to start extracting", c)
        c.kill("cpu-victim")
        c.start_worker("cpu", "cpu-rescuer")

        record = (await finish_all(store, [job_id], c))[job_id]
        assert record.state == "done", record.error
        assert c.starts(extract, "cpu-victim") == 1 and c.starts(extract, "cpu-rescuer") == 1
        assert await store.runs(job_id) == {
            "extract": 1, "segment": 1, "transcribe": 1, "merge": 1, "render": 1, "notify": 1,
        }
        res = c.cli("submit", "--wait", "-q", "-o", str(tmp_path / "out"), str(data_dir / "jfk.flac"))
        assert res.returncode == 0, res.stderr
        assert transcript_view(tmp_path / "out", "jfk") == reference["jfk.flac"]
    finally:
        await store.aclose()


async def test_redis_restart_loses_no_job(redis_server_factory, make_cluster, reference, data_dir, tmp_path):
    server = redis_server_factory(appendonly=True)
    c = make_cluster(server.url)
    # slowed down so that, when Redis dies, some jobs are mid-stage and the others still queued
    c.start_worker("cpu", "cpu", VTP_TEST_STAGE_DELAY="extract:0.5")
    c.start_worker("gpu", "gpu", VTP_TEST_STAGE_DELAY="transcribe:1")
    c.wait_ready(("cpu", "cpu"), ("gpu", "gpu"))
    inputs = []
    for i in range(4):
        source = data_dir / ("talk_tts.mp4" if i % 2 else "jfk.flac")
        copy = tmp_path / f"in{i}{source.suffix}"
        shutil.copyfile(source, copy)
        inputs.append(copy)
    job_ids = c.submit(*inputs, extra=("--no-reuse",))
    assert len(job_ids) == 4

    probe = redis_sync.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + 60
        while not probe.keys(IN_PROGRESS + "*:transcribe:*"):  # the GPU worker is mid-batch
            assert time.monotonic() < deadline, c.logs()
            time.sleep(0.02)
        states = [JobStore_state(probe, j) for j in job_ids]
    finally:
        probe.close()
    assert "done" not in states, states

    server.kill()  # SIGKILL: no shutdown save; the append-only file is all that survives
    time.sleep(4)  # longer than redis-py's own retries of a command in flight
    server.restart()

    store = JobStore.open(server.url)
    try:
        records = await finish_all(store, job_ids, c)
        assert [r.state for r in records.values()] == ["done"] * 4, [r.error for r in records.values()]
        for job_id in job_ids:
            runs = await store.runs(job_id)
            assert runs["merge"] == runs["notify"] == 1, runs
    finally:
        await store.aclose()
    for worker in ("cpu", "gpu"):
        assert c.procs[worker].poll() is None, f"worker {worker} died with Redis\n{c.logs()}"
    res = c.cli("submit", "--wait", "-q", "-o", str(tmp_path / "out"), *map(str, inputs[:2]))
    assert res.returncode == 0, res.stderr
    assert transcript_view(tmp_path / "out", "in0") == reference["jfk.flac"]
    assert transcript_view(tmp_path / "out", "in1") == reference["talk_tts.mp4"]


def JobStore_state(client: redis_sync.Redis, job_id: str) -> str:  # noqa: N802 - reads like the async API
    from app.messages import JobRecord, decode

    return decode(client.get(constants.job_key(job_id)), JobRecord).state


async def test_ten_jobs_two_gpu_workers(redis_server_factory, make_cluster, reference, data_dir, tmp_path):
    server = redis_server_factory()
    c = make_cluster(server.url)
    c.start_worker("cpu", "cpu", concurrency=2)
    c.start_worker("gpu", "gpu-a")
    c.start_worker("gpu", "gpu-b")
    c.wait_ready(("cpu", "cpu"), ("gpu-a", "gpu"), ("gpu-b", "gpu"))
    inputs = []
    for i in range(10):
        copy = tmp_path / f"clip{i:02d}.flac"
        shutil.copyfile(data_dir / "jfk.flac", copy)
        inputs.append(copy)

    res = c.cli("submit", "--wait", "-q", "--no-reuse", "-o", str(tmp_path / "out"), *map(str, inputs), timeout=150)
    assert res.returncode == 0, res.stderr + c.logs()
    assert len(res.stdout.strip().splitlines()) == 10

    store = JobStore.open(server.url)
    try:
        job_ids = await store.list_ids(100)
        assert len(job_ids) == 10
        for job_id in job_ids:
            assert (await store.get(job_id)).state == "done"
            # none processed twice: every stage, and above all the fan-in, completed once
            assert await store.runs(job_id) == {
                "extract": 1, "segment": 1, "transcribe": 1, "merge": 1, "render": 1, "notify": 1,
            }
            states = [e.state async for e in store.events(job_id)]
            assert states.count("done") == 1
            batch = constants.arq_job_id(job_id, "transcribe", 0)
            assert c.starts(batch) == 1
    finally:
        await store.aclose()
    per_worker = [c.logs().count("transcribe:0:transcribe(")] + [
        (c.work_dir / f"worker-{w}.log").read_text().count(":transcribe(") for w in ("gpu-a", "gpu-b")
    ]
    assert per_worker[0] == 10 and per_worker[1] + per_worker[2] == 10
    assert per_worker[1] > 0 and per_worker[2] > 0, per_worker  # both GPU workers took a share
    for i in range(10):
        assert transcript_view(tmp_path / "out", f"clip{i:02d}") == reference["jfk.flac"]
