"""JobStore against a real redis-server: the state machine, idempotency, progress, events, fan-in."""

from __future__ import annotations

import anyio
import pytest

from app import constants, errors
from app.dag import check_transition
from app.jobs import JobStore, options_digest
from app.messages import BatchTranscript, JobRecord, ProgressEvent, Segment, TranscribeOptions

pytestmark = pytest.mark.anyio

HAPPY_PATH = ["extracting", "segmenting", "transcribing", "merging", "rendering", "done"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def store(redis_url):
    s = JobStore.open(redis_url, result_ttl=600)
    yield s
    await s.aclose()


def new_record(job_id: str = "job1", **kw) -> JobRecord:
    return JobRecord(id=job_id, input_name="talk.mp4", basename="talk", media_key=f"jobs/{job_id}/media", **kw)


async def test_create_and_get_roundtrip(store):
    record, created = await store.create(new_record(owner="ann"))
    assert created and record.state == "queued" and record.created_at > 0
    got = await store.get("job1")
    assert got == record
    assert await store.list_ids() == ["job1"]
    with pytest.raises(errors.JobNotFound):
        await store.get("nope")


async def test_happy_path_records_timings_and_events(store):
    await store.create(new_record())
    for state in HAPPY_PATH:
        await store.transition("job1", state)
    record = await store.get("job1")
    assert record.state == "done" and record.terminal and record.finished_at >= record.created_at
    assert set(record.timings) == {"queue", "extract", "segment", "transcribe", "merge", "render"}
    states = [e.state async for e in store.events("job1")]
    assert states == ["queued", *HAPPY_PATH]
    # a finished record expires with the result TTL
    assert 0 < await store.redis.ttl(constants.job_key("job1")) <= 600


async def test_no_speech_skips_transcribing(store):
    await store.create(new_record())
    for state in ["extracting", "segmenting", "merging"]:
        await store.transition("job1", state)
    assert (await store.get("job1")).state == "merging"


@pytest.mark.parametrize(
    "current,to",
    [
        ("queued", "segmenting"),  # skipping a stage
        ("queued", "done"),
        ("extracting", "merging"),
        ("merging", "transcribing"),  # backwards
        ("rendering", "queued"),
    ],
)
def test_invalid_transitions_raise(current, to):
    with pytest.raises(errors.JobError, match="invalid transition"):
        check_transition("j", current, to)


@pytest.mark.parametrize("final", ["done", "failed", "cancelled"])
@pytest.mark.parametrize("to", ["extracting", "failed", "cancelled", "done"])
def test_final_states_are_final(final, to):
    with pytest.raises(errors.JobError):
        check_transition("j", final, to)


def test_cancelled_raises_job_cancelled():
    with pytest.raises(errors.JobCancelled):
        check_transition("j", "cancelled", "merging")


async def test_invalid_transition_leaves_record_unchanged(store):
    await store.create(new_record())
    with pytest.raises(errors.JobError):
        await store.transition("job1", "merging")
    assert (await store.get("job1")).state == "queued"


async def test_reentering_a_state_is_a_noop(store):
    await store.create(new_record())
    first = await store.transition("job1", "extracting")
    again = await store.transition("job1", "extracting")
    assert again.state == "extracting" and again.state_since == first.state_since


async def test_expect_guards_a_transition(store):
    await store.create(new_record())
    await store.transition("job1", "extracting")
    assert await store.transition("job1", "segmenting", expect="queued") is None
    assert (await store.get("job1")).state == "extracting"
    assert (await store.transition("job1", "segmenting", expect="extracting")).state == "segmenting"


async def test_fail_and_cancel(store):
    await store.create(new_record("a"))
    await store.create(new_record("b"))
    await store.transition("a", "extracting")
    assert await store.fail("a", "a.mp4: not a media file")
    assert not await store.fail("a", "again")  # already final: unchanged
    record = await store.get("a")
    assert record.state == "failed" and record.error == "a.mp4: not a media file"
    cancelled = await store.cancel("b")
    assert cancelled.state == "cancelled"
    with pytest.raises(errors.JobError, match="already failed"):
        await store.cancel("a")
    with pytest.raises(errors.JobCancelled):
        await store.transition("b", "extracting")
    events = [e async for e in store.events("a")]
    assert events[-1].state == "failed" and events[-1].message == "a.mp4: not a media file"


async def test_idempotency_key_returns_the_same_job(store):
    first, created = await store.create(new_record("j1", owner="ann", idempotency_key="k"))
    again, created_again = await store.create(new_record("j2", owner="ann", idempotency_key="k"))
    other_owner, created_other = await store.create(new_record("j3", owner="bob", idempotency_key="k"))
    assert created and not created_again and created_other
    assert again.id == first.id == "j1" and other_owner.id == "j3"
    assert await store.find("j2") is None
    assert (await store.find_by_key("ann", "k")).id == "j1"


async def test_concurrent_creates_with_one_key_agree(store):
    results = []

    async def create(i: int) -> None:
        results.append(await store.create(new_record(f"j{i}", idempotency_key="same")))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(create, i)
    assert len({r.id for r, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_reuse_needs_same_owner_media_options_and_done(store):
    opts = TranscribeOptions()
    record, _ = await store.create(new_record("j1", owner="ann", sha256="abc", options=opts))
    for state in HAPPY_PATH[:-1]:
        await store.transition("j1", state)
    await store.remember_done(await store.get("j1"))  # not done yet: nothing remembered
    assert await store.find_reusable("ann", "abc", opts) is None
    done = await store.transition("j1", "done")
    await store.remember_done(done)
    assert (await store.find_reusable("ann", "abc", opts)).id == "j1"
    assert await store.find_reusable("bob", "abc", opts) is None
    assert await store.find_reusable("ann", "abd", opts) is None
    other = TranscribeOptions(beam_size=1)
    assert options_digest(other) != options_digest(opts)
    assert await store.find_reusable("ann", "abc", other) is None


async def test_progress_only_moves_forward(store):
    await store.create(new_record())
    await store.progress("job1", chunks_done=3, audio_done=30.0)
    await store.progress("job1", chunks_done=1, audio_done=10.0)  # a late report from a slower worker
    record = await store.get("job1")
    assert (record.chunks_done, record.audio_done) == (3, 30.0)


def part(index: int, seconds: float = 10.0) -> BatchTranscript:
    seg = Segment(start=index * 10.0, end=index * 10.0 + 5, text=f"batch {index}", chunk=index)
    return BatchTranscript(batch_index=index, segments=[seg], language="en", audio_seconds=seconds, wall_seconds=0.1)


async def test_fan_in_counts_each_batch_once(store):
    await store.create(new_record())
    await store.start_fan_out("job1", 3)
    await store.start_fan_out("job1", 99)  # a retried segment keeps the first count
    assert (await store.record_batch("job1", part(0), 2)).batches_left == 2
    again = await store.record_batch("job1", part(0), 2)  # batch 0 retried: no second decrement
    assert (again.batches_left, again.chunks_done, again.audio_done) == (2, 2, 10.0)
    assert (await store.record_batch("job1", part(2), 1)).batches_left == 1
    last = await store.record_batch("job1", part(1, 5.5), 1)
    assert (last.batches_left, last.chunks_done, last.audio_done) == (0, 4, 25.5)
    assert [p.batch_index for p in await store.batch_parts("job1")] == [0, 1, 2]
    # a duplicate after the end still reads zero (so it may enqueue merge: arq dedupes that)
    assert (await store.record_batch("job1", part(1), 1)).batches_left == 0


async def test_fan_in_concurrent_batches_reach_zero_exactly_once(store):
    await store.create(new_record())
    await store.start_fan_out("job1", 20)
    lefts: list[int] = []

    async def report(i: int) -> None:
        lefts.append((await store.record_batch("job1", part(i % 20), 1)).batches_left)

    async with anyio.create_task_group() as tg:
        for i in range(60):  # every batch three times, interleaved
            tg.start_soon(report, i)
    # every report after the last new batch reads 0, but the counter passed 1 -> 0 exactly once
    assert min(lefts) == 0 and lefts.count(1) <= 3
    assert int(await store.redis.get(constants.dag_key("job1", "pending"))) == 0


async def test_fan_in_without_fan_out_is_an_error(store):
    await store.create(new_record())
    with pytest.raises(errors.JobError, match="fan-out state is missing"):
        await store.record_batch("job1", part(0), 1)
    # a job that does not exist (deleted, expired) gets no scratch state at all
    with pytest.raises(errors.JobNotFound, match="deleted, or its record has expired"):
        await store.record_batch("ghost", part(0), 1)
    assert await store.redis.keys(constants.dag_key("ghost", "*")) == []


async def test_events_follow_a_running_job(store):
    await store.create(new_record())
    seen: list[ProgressEvent] = []

    async def follow() -> None:
        async for event in store.events("job1", poll_s=0.1):
            seen.append(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.sleep(0.2)
        await store.transition("job1", "extracting")
        await store.publish(ProgressEvent(job_id="job1", state="extracting", message="hello"))
        await store.cancel("job1")
    assert [e.state for e in seen] == ["queued", "extracting", "extracting", "cancelled"]
    assert seen[2].message == "hello"


async def test_unreachable_redis_is_a_queue_error():
    from tests.support.dag_cluster import free_port

    store = JobStore.open(f"redis://127.0.0.1:{free_port()}/0", outage_s=0.5)
    try:
        with pytest.raises(errors.QueueError, match=r"cannot reach Redis at 127\.0\.0\.1:\d+/0"):
            await store.get("job1")
    finally:
        await store.aclose()


async def test_concurrent_submits_on_separate_connections_make_one_job(redis_url):
    """Eight submitters, each its own client (as eight `vtp submit` processes), one key, many
    rounds: always exactly one job, and every loser is handed the winner's record."""
    stores = [JobStore.open(redis_url, result_ttl=600) for _ in range(8)]
    try:
        for round_ in range(50):
            results = []

            async def create(i: int, store: JobStore) -> None:
                results.append(await store.create(new_record(f"r{round_}j{i}", idempotency_key=f"key{round_}")))

            async with anyio.create_task_group() as tg:
                for i, s in enumerate(stores):
                    tg.start_soon(create, i, s)
            assert sum(created for _, created in results) == 1
            assert len({r.id for r, _ in results}) == 1
            winner = results[0][0].id
            assert await stores[0].redis.exists(constants.job_key(winner))
        assert len(await stores[0].list_ids(1000)) == 50
    finally:
        for s in stores:
            await s.aclose()


async def test_idempotency_key_of_an_expired_job_is_free_again(store):
    first, _ = await store.create(new_record("old", idempotency_key="k"))
    await store.redis.delete(constants.job_key("old"))  # its record expired before its key
    again, created = await store.create(new_record("new", idempotency_key="k"))
    assert created and again.id == "new"
    assert (await store.find_by_key("", "k")).id == "new"
