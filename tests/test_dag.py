"""The distributed DAG end to end: real workers (subprocesses) on a private redis-server.

One CPU and one GPU worker serve the whole module (they start once: model loading is the slow
part); each test uses its own ``--owner`` so that reuse of identical media never crosses tests.
The S3 test runs its own Redis and workers against moto's S3 server.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time

import anyio
import pytest

from app import constants
from app.jobs import JobStore
from tests.support.dag_cluster import free_port
from tests.support.redis_server import RedisServer
from tests.support.dag_cluster import ROOT, Cluster, local_reference, transcript_view

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

SUMMARY = re.compile(r"^(?P<name>\S+): (?P<dur>\d+\.\d) s audio in \d+\.\d s \(\d+\.\dx realtime\) -> (?P<outs>.+)$")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)", pytrace=False)
    server = RedisServer(free_port(), tmp_path_factory.mktemp("dag-redis"), appendonly=False)
    server.start()
    c = Cluster(server.url, tmp_path_factory.mktemp("dag"))
    try:
        c.start_worker("cpu", "cpu-1", concurrency=2)
        c.start_worker("gpu", "gpu-1")
        c.wait_ready(("cpu-1", "cpu"), ("gpu-1", "gpu"))
        yield c
    finally:
        c.close()
        server.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engines, data_dir):
    """Transcripts of undisturbed local runs, to compare the DAG's outputs with."""
    out = tmp_path_factory.mktemp("reference")
    return {name: local_reference(engines, data_dir / name, out) for name in ("jfk.flac", "talk_tts.mp4")}


@pytest.fixture
async def store(cluster):
    s = JobStore.open(cluster.redis_url)
    yield s
    await s.aclose()


async def wait_final(store: JobStore, job_id: str, timeout: float = 90):
    with anyio.fail_after(timeout):
        return await store.wait(job_id)


async def wait_state(store: JobStore, job_id: str, states: set[str], timeout: float = 60):
    with anyio.fail_after(timeout):
        while True:
            record = await store.get(job_id)
            if record.state in states:
                return record
            await anyio.sleep(0.02)


def attempts(cluster: Cluster, arq_id: str) -> int:
    """How often workers started an arq job (arq logs ``→ <id>:<function>(`` at each start)."""
    return cluster.logs().count(f"→ {arq_id}:")


async def test_fan_out_fan_in_submit_wait(cluster, store, reference, data_dir, tmp_path):
    res = cluster.cli("submit", "--wait", "--owner", "fan", "-o", str(tmp_path), str(data_dir / "talk_tts.mp4"))
    assert res.returncode == 0, res.stderr + cluster.logs()
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    m = SUMMARY.match(lines[0])
    assert m and m["name"] == "talk_tts.mp4" and m["dur"] == "65.0", lines[0]
    assert m["outs"] == ", ".join(str(tmp_path / f"talk_tts.{f}") for f in ("txt", "srt", "vtt", "json"))
    assert transcript_view(tmp_path, "talk_tts") == reference["talk_tts.mp4"]

    job_id = (await store.list_ids(1))[0]
    record = await store.get(job_id)
    assert record.state == "done" and record.chunks_done == record.chunks_total == 3
    assert record.audio_done == record.audio_total > 60
    assert {"queue", "extract", "segment", "transcribe", "merge", "render"} <= set(record.timings)
    assert set(record.waits) == {"extract", "segment", "transcribe", "merge", "render", "notify"}
    # three batches fanned out; each counted once; merge and everything after it ran exactly once
    assert await store.runs(job_id) == {
        "extract": 1, "segment": 1, "transcribe": 3, "merge": 1, "render": 1, "notify": 1,
    }
    states = [e.state async for e in store.events(job_id)]
    assert states.count("done") == 1 and states[-1] == "done"
    assert states.index("transcribing") < states.index("merging") < states.index("rendering")


async def test_submit_without_wait_prints_the_job_id_and_status_shows_it(cluster, store, data_dir):
    (job_id,) = cluster.submit(data_dir / "jfk.flac", extra=("--owner", "nowait"))
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    final = await wait_final(store, job_id)
    assert final.state == "done", final.error
    res = cluster.cli("status", job_id)
    assert res.returncode == 0 and res.stdout.startswith(f"{job_id}  done") and "jfk.flac" in res.stdout
    res = cluster.cli("status", "--json", job_id)
    assert '"state":"done"' in res.stdout
    res = cluster.cli("status", "0" * 32)
    assert res.returncode == 1 and "no job" in res.stderr


async def test_idempotency_key_returns_the_same_job(cluster, store, data_dir):
    args = ("--owner", "idem", "--no-reuse", "--idempotency-key", "upload-42")
    (first,) = cluster.submit(data_dir / "jfk.flac", extra=args)
    (second,) = cluster.submit(data_dir / "jfk.flac", extra=args)
    assert first == second
    (other,) = cluster.submit(data_dir / "jfk.flac", extra=("--owner", "idem", "--no-reuse", "--idempotency-key", "upload-43"))
    assert other != first
    for job_id in (first, other):
        assert (await wait_final(store, job_id)).state == "done"
    assert await store.runs(first) == {"extract": 1, "segment": 1, "transcribe": 1, "merge": 1, "render": 1, "notify": 1}


async def test_identical_media_returns_the_finished_job(cluster, store, reference, data_dir, tmp_path):
    """Documented choice: same owner + same sha256 + same options as a ``done`` job -> that job."""
    res = cluster.cli("submit", "--wait", "-q", "--owner", "reuse", "-o", str(tmp_path / "a"), str(data_dir / "jfk.flac"))
    assert res.returncode == 0, res.stderr
    (first,) = await store.list_ids(1)

    copy = tmp_path / "renamed.flac"
    shutil.copyfile(data_dir / "jfk.flac", copy)  # same bytes, another name
    res = cluster.cli("submit", "--wait", "--owner", "reuse", "-o", str(tmp_path / "b"), str(copy))
    assert res.returncode == 0, res.stderr
    assert f"job {first} (same media and options, already done)" in res.stderr
    assert SUMMARY.match(res.stdout.strip())["name"] == "renamed.flac"
    assert transcript_view(tmp_path / "b", "renamed") == reference["jfk.flac"]
    assert (await store.list_ids(1)) == [first]  # no new job

    (changed,) = cluster.submit(copy, extra=("--owner", "reuse", "--beam-size", "1"))
    (again,) = cluster.submit(copy, extra=("--owner", "reuse", "--no-reuse"))
    assert len({first, changed, again}) == 3
    for job_id in (changed, again):
        assert (await wait_final(store, job_id)).state == "done"


async def test_cancel_stops_the_remaining_stages(cluster, store, data_dir):
    (job_id,) = cluster.submit(data_dir / "talk_tts.mp4", extra=("--owner", "cancel"))
    await wait_state(store, job_id, {"segmenting", "transcribing"})
    res = cluster.cli("cancel", job_id)
    assert res.returncode == 0 and res.stdout.strip() == f"{job_id}: cancelled", res.stderr
    record = await wait_final(store, job_id)
    assert record.state == "cancelled" and not record.outputs

    # every queued stage of it still runs through arq, sees "cancelled" and returns
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and await cluster_busy(cluster):
        await anyio.sleep(0.1)
    runs = await store.runs(job_id)
    assert "merge" not in runs and "notify" not in runs, runs
    assert (await store.get(job_id)).state == "cancelled"

    res = cluster.cli("cancel", job_id)
    assert res.returncode == 1 and "was cancelled" in res.stderr


async def cluster_busy(cluster: Cluster) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(cluster.redis_url)
    try:
        queued = await client.zcard(constants.QUEUE_CPU) + await client.zcard(constants.QUEUE_GPU)
        return queued > 0
    finally:
        await client.aclose()


async def test_bad_media_fails_at_once_with_a_readable_reason(cluster, store, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(os.urandom(50_000))
    reason = "broken.mp4: not a media file ffmpeg can read (corrupt, truncated or not audio/video)"
    # submit reads the headers before uploading (as the web upload does): no job at all
    before = await store.list_ids(100)
    res = cluster.cli("submit", "-q", "--owner", "bad", str(broken))
    assert res.returncode == 1 and res.stderr.splitlines() == [f"vtp: error: {reason}"]
    assert await store.list_ids(100) == before
    # one that gets past it (no duration limit at the submitter: no probe) fails in extract
    res = cluster.cli(
        "submit", "--wait", "-q", "--owner", "bad", "-o", str(tmp_path / "out"), str(broken), VTP_MAX_DURATION="0"
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"vtp: error: {reason}"
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    (job_id,) = await store.list_ids(1)
    record = await store.get(job_id)
    assert record.state == "failed" and record.error.startswith("broken.mp4: not a media file")
    assert attempts(cluster, constants.arq_job_id(job_id, "extract")) == 1  # permanent: no retry


async def test_poison_job_fails_after_its_tries_without_blocking_the_queue(cluster, store, data_dir):
    """A job whose media vanished from storage fails transiently every time (StorageError)."""
    from app.config import Settings
    from app.messages import JobRecord
    from workers.runtime import enqueue

    settings = Settings.from_env(cluster.env)
    poison, _ = await store.create(
        JobRecord(id="poison" + "0" * 26, input_name="gone.mp4", basename="gone", media_key="jobs/poison/media")
    )
    redis = await enqueue.connect(settings)
    try:
        await enqueue.enqueue_first_stage(redis, poison, settings=settings)
    finally:
        await redis.aclose()
    (good,) = cluster.submit(data_dir / "jfk.flac", extra=("--owner", "poison-neighbour", "--no-reuse"))

    good_record = await wait_final(store, good)
    assert good_record.state == "done"
    record = await wait_final(store, poison.id, timeout=60)
    assert record.state == "failed"
    assert "missing artifact" in record.error and record.error.endswith("(gave up after 3 tries)")
    assert attempts(cluster, constants.arq_job_id(poison.id, "extract")) == 3


def test_worker_check_reports_health(cluster):
    ok = cluster.cli("worker", "--queue", "gpu", "--check", "--name", "gpu-1")
    assert ok.returncode == 0 and "j_complete=" in ok.stdout
    missing = cluster.cli("worker", "--queue", "gpu", "--check", "--name", "nobody")
    assert missing.returncode == 1 and "no live worker" in missing.stderr
    dead = cluster.cli("worker", "--queue", "cpu", "--check", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert dead.returncode == 1 and "cannot reach Redis" in dead.stderr


def test_submit_without_redis_says_so(data_dir, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "submit", str(data_dir / "jfk.flac")],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "VTP_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert re.fullmatch(r"vtp: error: cannot reach Redis at 127\.0\.0\.1:\d+/0: .+", res.stderr.strip())


@pytest.mark.slow
def test_s3_storage_end_to_end(redis_server_factory, data_dir, reference, tmp_path):
    """Artifacts in S3 instead of a shared disk. The S3 server is moto's (``moto.server``),
    a real S3-compatible HTTP server on a loopback port, not a mock inside the process."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        aws = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="vtp-test")
        server = redis_server_factory()
        c = Cluster(server.url, tmp_path / "cluster", env={**aws, "VTP_STORAGE": "s3://vtp-test/run1"})
        try:
            c.start_worker("cpu", "s3-cpu")
            c.start_worker("gpu", "s3-gpu")
            c.wait_ready(("s3-cpu", "cpu"), ("s3-gpu", "gpu"))
            res = c.cli("submit", "--wait", "-q", "-o", str(tmp_path / "out"), str(data_dir / "jfk.flac"))
            assert res.returncode == 0, res.stderr + c.logs()
        finally:
            c.close()
        assert transcript_view(tmp_path / "out", "jfk") == reference["jfk.flac"]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vtp-test", Prefix="run1/")["Contents"]]
        assert any(k.endswith("/media") for k in keys)
        assert any(k.endswith("/audio.pcm") for k in keys)
        assert {k.rsplit(".", 1)[-1] for k in keys if "/out/" in k} == {"txt", "srt", "vtt", "json"}
        assert not any("/batches/" in k for k in keys)  # dropped once the job was done
        assert not (c.data_dir / "jobs").exists()  # nothing went to the local disk
    finally:
        moto.stop()


# -- the task wrapper in-process (no worker): the paths that are hard to reach from outside --


async def test_a_try_beyond_the_last_fails_the_job_instead_of_leaving_it_stuck(redis_url):
    """arq starts one more try than VTP_JOB_TRIES (its max_tries) when the previous try's worker
    died; that try must end the job ``failed``, because arq would drop the next one silently."""
    from datetime import datetime, timezone

    from app.config import Settings
    from app.messages import ExtractRequest, JobRecord, encode
    from workers.runtime import tasks

    store = JobStore.open(redis_url)
    try:
        await store.create(JobRecord(id="lost", input_name="a.mp4", media_key="jobs/lost/media"))
        await store.transition("lost", "extracting")
        settings = Settings.from_env({"REDIS_URL": redis_url, "VTP_JOB_TRIES": "3"})
        ctx = {"store": store, "settings": settings, "job_try": 4, "enqueue_time": datetime.now(timezone.utc)}
        req = ExtractRequest(job_id="lost", media_key="jobs/lost/media", source_name="a.mp4")
        result = await tasks.extract_task(ctx, encode(req))
        record = await store.get("lost")
        assert record.state == "failed" and result == record.error
        assert record.error == "extract gave up after 3 tries (worker lost or timed out)"
    finally:
        await store.aclose()


async def test_a_deadline_abandons_work_stuck_in_a_thread():
    """The engine runs in a thread that cancellation cannot interrupt; the stage deadline must
    still fire on time (else arq's own timeout would record a failure behind vtp's back)."""
    from workers.runtime.policy import within

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(0.2, anyio.to_thread.run_sync(time.sleep, 1.5))
    assert time.monotonic() - started < 1.0
    assert await within(1.0, asyncio.sleep(0.01, result="ok")) == "ok"
