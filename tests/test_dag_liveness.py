"""No job stuck, none lost: leases, deadlines, the sweeper and shutdowns, against real workers.

Every test starts its own redis-server and worker subprocesses (``dag_cluster``), with short
leases (``VTP_LEASE`` 5 s) and a sweep every 2 s, so that what takes a minute or two in
production takes seconds here.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import anyio
import pytest

from app import constants, errors, keys
from app.config import Settings
from app.jobs import JobStore
from app.redis_outage import OUTAGE_CLOCK, retrying
from app.messages import ExtractRequest, JobRecord, encode
from app.storage import LocalStorage
from tests.support.dag_cluster import Cluster, wait_until
from workers.sweeper import Sweeper

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

IN_PROGRESS = "arq:in-progress:"  # arq.constants.in_progress_key_prefix
RETRY = "arq:retry:"  # arq.constants.retry_key_prefix


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def finish(store: JobStore, job_id: str, cluster: Cluster, timeout: float = 60) -> JobRecord:
    try:
        with anyio.fail_after(timeout):
            return await store.wait(job_id)
    except TimeoutError:
        raise AssertionError(f"job {job_id} did not end: {await store.find(job_id)}\n{cluster.logs()}") from None


async def record_only(store: JobStore, cluster: Cluster, source) -> JobRecord:
    """What a ``submit`` that died right after writing the record leaves: media and record, no
    stage job."""
    job_id = uuid.uuid4().hex
    await LocalStorage(cluster.data_dir).put_file(keys.media_key(job_id), source)
    record, _ = await store.create(
        JobRecord(id=job_id, input_name=source.name, basename=source.stem, media_key=keys.media_key(job_id))
    )
    return record


# -- leases ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_killed_cpu_worker_reruns_within_its_lease_whatever_the_timeout(redis_server_factory, make_cluster, data_dir):
    """VTP_CPU_TIMEOUT is an hour, as by default: the rerun still comes within the 5 s lease."""
    server = redis_server_factory()
    c = make_cluster(server.url, VTP_CPU_TIMEOUT="3600")
    c.start_worker("cpu", "victim", VTP_TEST_STAGE_DELAY="extract:30")
    c.start_worker("gpu", "gpu")
    c.wait_ready(("victim", "cpu"), ("gpu", "gpu"))
    store = JobStore.open(server.url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")
        extract = constants.arq_job_id(job_id, "extract")
        await wait_until(lambda: store.redis.exists(IN_PROGRESS + extract), 30, "extract to start", c)
        c.kill("victim")
        killed = time.monotonic()
        c.start_worker("cpu", "rescuer")
        await wait_until(lambda: anyio.to_thread.run_sync(c.starts, extract, "rescuer"), 30, "the rerun", c)
        assert time.monotonic() - killed < 5 + 3  # the lease, a poll, the rescuer's start-up
        record = await finish(store, job_id, c)
        assert record.state == "done", record.error
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_long_healthy_stage_keeps_its_lease(redis_server_factory, make_cluster, data_dir):
    """An extraction three leases long, with an idle second CPU worker: it is never taken over."""
    server = redis_server_factory()
    c = make_cluster(server.url, VTP_TEST_STAGE_DELAY="extract:15")
    c.start_worker("cpu", "cpu-a")
    c.start_worker("cpu", "cpu-b")
    c.start_worker("gpu", "gpu")
    c.wait_ready(("cpu-a", "cpu"), ("cpu-b", "cpu"), ("gpu", "gpu"))
    store = JobStore.open(server.url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")
        record = await finish(store, job_id, c)
        assert record.state == "done", record.error
        assert c.starts(constants.arq_job_id(job_id, "extract")) == 1
        assert (await store.runs(job_id))["extract"] == 1
        assert (await store.redrives(job_id)) == {}  # the sweeper saw it alive all along
    finally:
        await store.aclose()


async def test_deadline_leaves_out_time_waiting_for_redis():
    """A stage that spends 1.5 s of a 1 s deadline waiting for an unreachable Redis still ends well."""
    from redis import exceptions as redis_errors

    from workers.runtime.policy import within as _within

    async def flaky_redis_op():
        until = time.monotonic() + 1.5

        async def op():
            if time.monotonic() < until:
                raise redis_errors.ConnectionError("Redis is loading the dataset in memory")
            return "ok"

        return await retrying(op, where="test")

    assert await _within(1.0, flaky_redis_op()) == "ok"
    with pytest.raises(TimeoutError):  # plain slowness still counts
        await _within(0.3, asyncio.sleep(1.0))
    assert OUTAGE_CLOCK.get() is None


@pytest.mark.slow
async def test_sigterm_during_a_stage_does_not_use_up_a_try(redis_server_factory, make_cluster, data_dir):
    """One try per stage: a deploy that stops a worker mid-extract (SIGTERM, then SIGTERM again
    to stop at once rather than drain) must not make the rerun the second try."""
    server = redis_server_factory()
    c = make_cluster(server.url, VTP_JOB_TRIES="1")
    c.start_worker("cpu", "old", VTP_TEST_STAGE_DELAY="extract:20")
    c.start_worker("gpu", "gpu")
    c.wait_ready(("old", "cpu"), ("gpu", "gpu"))
    store = JobStore.open(server.url)
    try:
        (job_id,) = c.submit(data_dir / "jfk.flac")
        extract = constants.arq_job_id(job_id, "extract")

        async def inside_extract():  # the stage itself has begun (not only arq's claim of it)
            return (await store.get(job_id)).state == "extracting"

        await wait_until(inside_extract, 30, "extract to start", c)
        c.procs["old"].send_signal(signal.SIGTERM)  # drains: takes no new job
        time.sleep(0.5)
        c.kill("old", signal.SIGTERM)  # stops now: the extract goes back to the queue, its try handed back
        c.start_worker("cpu", "new")
        record = await finish(store, job_id, c)
        assert record.state == "done", record.error
        assert c.starts(extract, "new") == 1
    finally:
        await store.aclose()


# -- the sweeper ----------------------------------------------------------------------------


@pytest.fixture
async def swept_cluster(redis_server_factory, make_cluster):
    """A private Redis and a CPU and a GPU worker (which sweep every 2 s), with a JobStore."""
    server = redis_server_factory()
    c = make_cluster(server.url)
    store = JobStore.open(server.url)
    yield c, store
    await store.aclose()


def start_workers(c: Cluster) -> None:
    c.start_worker("cpu", "cpu")
    c.start_worker("gpu", "gpu")
    c.wait_ready(("cpu", "cpu"), ("gpu", "gpu"))


@pytest.mark.slow
async def test_sweeper_drives_a_job_whose_submit_died_before_the_enqueue(swept_cluster, data_dir):
    c, store = swept_cluster
    record = await record_only(store, c, data_dir / "jfk.flac")
    start_workers(c)
    done = await finish(store, record.id, c)
    assert done.state == "done", done.error
    assert await store.redrives(record.id) == {"queued": 1}
    assert "re-driving" in c.logs()


@pytest.mark.slow
async def test_sweeper_redrives_a_stage_arq_dropped_after_it_expired(swept_cluster, data_dir):
    from workers.runtime.enqueue import connect

    c, store = swept_cluster
    record = await record_only(store, c, data_dir / "jfk.flac")
    redis = await connect(Settings.from_env({"REDIS_URL": c.redis_url}))
    try:  # queued with a 1 s expiry and no worker: arq will drop it as "job expired"
        req = ExtractRequest(job_id=record.id, media_key=record.media_key, source_name=record.input_name)
        await redis.enqueue_job(
            constants.FN_EXTRACT, encode(req), _job_id=constants.arq_job_id(record.id, "extract"),
            _queue_name=constants.QUEUE_CPU, _expires=1,
        )
    finally:
        await redis.aclose()
    await anyio.sleep(1.5)
    start_workers(c)
    done = await finish(store, record.id, c)
    assert done.state == "done", done.error
    assert "job expired" in c.logs() and "re-driving" in c.logs()
    assert (await store.runs(record.id))["extract"] == 1


@pytest.mark.slow
async def test_sweeper_fails_a_stage_arq_gave_up_on(swept_cluster, data_dir):
    """arq started the extract past max_tries (repeated worker deaths) and dropped it unseen."""
    c, store = swept_cluster
    (job_id,) = c.submit(data_dir / "jfk.flac")
    await store.redis.set(RETRY + constants.arq_job_id(job_id, "extract"), 99)
    start_workers(c)
    record = await finish(store, job_id, c)
    assert record.state == "failed"
    assert record.error == "extract gave up after 3 tries (worker lost or timed out)"


@pytest.mark.slow
async def test_sweeper_fails_a_job_no_worker_can_move(swept_cluster, data_dir):
    """Its transcribe jobs vanish every time (no GPU worker, queue flushed): failed after 3 re-drives."""
    c, store = swept_cluster
    c.start_worker("cpu", "cpu")
    c.wait_ready(("cpu", "cpu"))
    (job_id,) = c.submit(data_dir / "jfk.flac")
    deadline = time.monotonic() + 90
    while not (record := await store.get(job_id)).terminal:
        await store.redis.delete(constants.QUEUE_GPU)  # the batches are lost as soon as queued
        assert time.monotonic() < deadline, c.logs()
        await anyio.sleep(0.2)
    assert record.state == "failed"
    assert record.error.startswith("transcribe made no progress after 3 re-drives"), record.error


#: A Standard Webhooks key (whsec_ + base64 of 32 bytes).
WEBHOOK_SECRET = "whsec_" + "dGhlIHN3ZWVwZXIncyB3ZWJob29rIGtleSwgMzIgYnl0ZQ=="


@pytest.mark.slow
async def test_a_job_the_sweeper_fails_gets_its_webhook(swept_cluster, data_dir):
    """A job the sweeper fails ("gave up after N tries") gets its job.failed POST, signed, like any other end."""
    from aiohttp import web
    from standardwebhooks.webhooks import Webhook

    from tests.support.dag_cluster import free_port
    from workers.runtime.enqueue import connect

    c, store = swept_cluster
    seen: list[tuple[dict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        job_id = uuid.uuid4().hex
        source = data_dir / "jfk.flac"
        await LocalStorage(c.data_dir).put_file(keys.media_key(job_id), source)
        await store.create(
            JobRecord(
                id=job_id, input_name=source.name, basename=source.stem, media_key=keys.media_key(job_id),
                webhook_url=f"http://127.0.0.1:{port}/hook",
            )
        )
        redis = await connect(Settings.from_env({"REDIS_URL": c.redis_url}))
        try:  # arq started the extract past max_tries (repeated worker deaths) and drops it unseen
            req = ExtractRequest(job_id=job_id, media_key=keys.media_key(job_id), source_name=source.name)
            await redis.enqueue_job(
                constants.FN_EXTRACT, encode(req), _job_id=constants.arq_job_id(job_id, "extract"),
                _queue_name=constants.QUEUE_CPU,
            )
            await redis.set(RETRY + constants.arq_job_id(job_id, "extract"), 99)
        finally:
            await redis.aclose()
        c.start_worker("cpu", "cpu", VTP_WEBHOOK_SECRET=WEBHOOK_SECRET, VTP_PRIVATE_ALLOWLIST="127.0.0.0/8")
        c.wait_ready(("cpu", "cpu"))
        record = await finish(store, job_id, c)
        assert record.state == "failed" and record.error == "extract gave up after 3 tries (worker lost or timed out)"
        async def arrived() -> bool:
            return bool(seen)

        await wait_until(arrived, 30, "the webhook", c)
        headers, body = seen[0]
        event = Webhook(WEBHOOK_SECRET).verify(body, {k.lower(): v for k, v in headers.items()})
        assert event["type"] == "job.failed" and event["data"]["error"] == record.error
        assert await store.webhooks_due() == []
    finally:
        await runner.cleanup()


async def test_every_end_of_a_job_with_a_webhook_is_marked_due(redis_url):
    """Whoever ends a job (a stage, the sweeper, a cancel from the CLI) marks its webhook due in
    the same transaction; nothing else does (a webhook attempt on an ended job does not)."""
    from app.messages import WebhookDelivery

    store = JobStore.open(redis_url)
    try:
        for job_id in ("failed", "cancelled", "quiet"):
            url = "" if job_id == "quiet" else "https://example.com/hook"
            await store.create(JobRecord(id=job_id, media_key=keys.media_key(job_id), webhook_url=url))
        await store.fail("failed", "transcribe made no progress after 3 re-drives")
        await store.cancel("cancelled")
        await store.fail("quiet", "bad media")
        assert sorted(await store.webhooks_due()) == ["cancelled", "failed"]
        await store.webhook_queued("failed")
        await store.set_webhook("failed", WebhookDelivery(id="msg_failed", event="job.failed"))
        assert await store.fail("failed", "again") is False
        assert await store.webhooks_due() == ["cancelled"]
    finally:
        await store.aclose()


async def test_artifacts_of_ended_jobs_expire(redis_url, tmp_path):
    store = JobStore.open(redis_url, result_ttl=60)
    storage = LocalStorage(tmp_path / "data dir")  # a space in the path, on purpose
    try:
        settings = Settings.from_env({}, result_ttl=60, sweep_interval=1.0)
        sweeper = Sweeper(store, storage, queue=None, settings=settings)  # no active job: no queue needed
        for job_id in ("old", "new"):
            await store.create(JobRecord(id=job_id, media_key=keys.media_key(job_id)))
            await storage.put_bytes(keys.media_key(job_id), b"media")
            await store.fail(job_id, "bad media")
        report = await sweeper.sweep(now=time.time() + 30)
        assert report.expired == [] and (tmp_path / "data dir" / "jobs" / "old").exists()
        await store.redis.zadd(constants.ENDED_INDEX, {"old": time.time() - 61})
        report = await sweeper.sweep()
        assert report.expired == ["old"]
        assert not (tmp_path / "data dir" / "jobs" / "old").exists()
        assert (tmp_path / "data dir" / "jobs" / "new" / "media").exists()
        assert await store.list_ids() == ["new"]
    finally:
        await store.aclose()


async def test_one_sweeper_at_a_time(redis_url, tmp_path):
    stores = [JobStore.open(redis_url) for _ in range(3)]
    try:
        settings = Settings.from_env({}, sweep_interval=1.0)
        sweepers = [Sweeper(s, LocalStorage(tmp_path), None, settings) for s in stores]
        claims = await asyncio.gather(*(s.claim() for s in sweepers))
        assert sorted(claims) == [False, False, True]
        await anyio.sleep(1.0)
        assert sum(await asyncio.gather(*(s.claim() for s in sweepers))) == 1  # the next interval
    finally:
        for s in stores:
            await s.aclose()


def test_sweep_settings_are_read_from_the_environment():
    s = Settings.from_env({"VTP_LEASE": "20", "VTP_SWEEP_INTERVAL": "10", "VTP_STALL_TIMEOUT": "300"})
    assert (s.lease, s.sweep_interval, s.stall_timeout) == (20.0, 10.0, 300.0)
    with pytest.raises(errors.OptionsError):
        Settings.from_env({"VTP_LEASE": "soon"})


# -- vtp submit --wait never waits forever ---------------------------------------------------


@pytest.mark.slow
async def test_submit_wait_reports_a_job_that_stops_moving(redis_server_factory, make_cluster, data_dir, tmp_path):
    c = make_cluster(redis_server_factory().url)  # no worker at all
    started = time.monotonic()
    res = await anyio.to_thread.run_sync(
        lambda: c.cli("submit", "--wait", "-q", "--stall-timeout", "3", "-o", str(tmp_path), str(data_dir / "jfk.flac"), timeout=60)
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopped moving: no progress for 3 s while queued" in lines[0], res.stderr
    assert "vtp worker --queue cpu" in lines[0]
    assert time.monotonic() - started < 30


@pytest.mark.slow
async def test_submit_wait_follows_a_slow_stage(redis_server_factory, make_cluster, data_dir, tmp_path):
    """An 8 s extraction with a 3 s stall timeout: the worker's lease renewals show it is alive."""
    c = make_cluster(redis_server_factory().url, VTP_TEST_STAGE_DELAY="extract:8")
    start_workers(c)
    res = await anyio.to_thread.run_sync(
        lambda: c.cli("submit", "--wait", "-q", "--stall-timeout", "3", "-o", str(tmp_path), str(data_dir / "jfk.flac"), timeout=90)
    )
    assert res.returncode == 0, res.stderr + c.logs()
    assert (tmp_path / "jfk.txt").exists()


# -- cancel, then delete, while a stage runs ------------------------------------------------


async def test_scratch_writes_after_a_delete_bring_nothing_back(redis_url):
    """A batch in flight when its job is cancelled and deleted writes nothing afterwards; one
    in flight when its job is only cancelled writes keys that expire with the record."""
    from app.messages import BatchTranscript

    store = JobStore.open(redis_url, result_ttl=600)
    try:
        for job_id in ("deleted", "cancelled"):
            await store.create(JobRecord(id=job_id, media_key=keys.media_key(job_id)))
            await store.start_fan_out(job_id, 2)
            await store.count_run(job_id, "segment")
        part = BatchTranscript(batch_index=0, segments=[], language="en", audio_seconds=1.0, wall_seconds=0.1)

        record = await store.cancel("deleted")
        await store.delete(record)
        assert await store.redis.keys(constants.dag_key("deleted", "*")) == []
        with pytest.raises(errors.JobNotFound):
            await store.count_run("deleted", "transcribe")
        with pytest.raises(errors.JobNotFound):
            await store.record_batch("deleted", part, 1)
        with pytest.raises(errors.JobNotFound):
            await store.put_part("deleted", "transcript", part)
        with pytest.raises(errors.JobNotFound):
            await store.start_fan_out("deleted", 2)
        assert await store.redis.keys(constants.dag_key("deleted", "*")) == []

        await store.cancel("cancelled")
        await store.count_run("cancelled", "transcribe")
        fan = await store.record_batch("cancelled", part, 1)
        await store.put_part("cancelled", "transcript", part)
        assert fan.batches_left == 1
        record_ttl = await store.redis.ttl(constants.job_key("cancelled"))
        written = await store.redis.keys(constants.dag_key("cancelled", "*"))
        assert len(written) >= 5  # pending, runs, finished, parts, done, transcript
        for key in written:
            assert 0 < await store.redis.ttl(key) <= record_ttl, key
    finally:
        await store.aclose()


@pytest.mark.slow
async def test_cancel_then_delete_while_a_batch_runs(redis_server_factory, make_cluster, data_dir):
    """What DELETE /v1/jobs/{id} does twice (cancel, then delete) while the job's batch is on a
    GPU worker: once the batch has finished, nothing of the job is left in Redis."""
    server = redis_server_factory()
    c = make_cluster(server.url, VTP_TEST_STAGE_DELAY="transcribe:3")
    store = JobStore.open(server.url)
    try:
        start_workers(c)
        (job_id,) = c.submit(data_dir / "jfk.flac")
        running = constants.ARQ_IN_PROGRESS_PREFIX + f"{job_id}:transcribe:*"

        async def batch_running() -> bool:
            return bool(await store.redis.keys(running))

        await wait_until(batch_running, 60, "a transcribe in progress", c)
        record = await store.cancel(job_id)
        await store.delete(record)

        async def batches_done() -> bool:
            return not await store.redis.keys(running) and not await store.redis.zcard(constants.QUEUE_GPU)

        await wait_until(batches_done, 60, "the batches to end", c)
        await anyio.sleep(0.5)
        left = [k.decode() for k in await store.redis.keys(f"vtp:*{job_id}*")]
        assert [k for k in left if not k.startswith(constants.BEAT_PREFIX)] == [], (left, c.logs())
        assert "transcribe" in c.logs()
    finally:
        await store.aclose()
