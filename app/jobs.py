"""Distributed jobs in Redis: the record and its state machine, progress events, fan-in bookkeeping.

``JobStore`` is the only code that reads or writes vtp's Redis keys (``app.constants``); the
CLI, the arq workers and the web process all go through it. Every record update is a
WATCH/MULTI read-modify-write of the msgpack record, with the matching ``ProgressEvent``
appended to the job's event stream in the same transaction, so a reader never sees a state
without its event or the other way round.

State machine (``check_transition``; the states and edges come from the DAG table, ``app.dag``)::

    queued -> extracting -> segmenting -> transcribing -> merging -> rendering -> done
                                     \\________________________/ (no speech: no batches)
    any state before done -> failed | cancelled;   done, failed, cancelled are final

Re-entering the current state is allowed and changes nothing: that is what a retried stage does.

Events are a Redis *stream* per job rather than pub/sub: a client that connects late, or loses
its connection while Redis restarts, reads on from the last event it saw instead of missing
the end of the job.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlparse

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.asyncio.retry import Retry
from redis import exceptions as redis_errors

from app import constants, dag, errors
from app.messages import (
    TERMINAL_STATES,
    BatchTranscript,
    JobRecord,
    ProgressEvent,
    Stage,
    TranscribeOptions,
    decode,
    encode,
)

#: Scratch parts under ``vtp:dag:<id>:`` (see app.constants.DAG_PREFIX).
DAG_PARTS = ("audio", "segmentation", "pending", "finished", "parts", "done", "runs", "transcript", "redrives")
_EVENT_FIELD = b"e"
_STREAM_MAXLEN = 2000

#: A command whose connection drops mid-flight is retried a few times at once (redis-py's own
#: retry). That does not cover a *new* connection to a Redis that is down (redis-py does not
#: retry those), so every JobStore operation is also retried as a whole (``retrying``) for
#: as long as an outage may last: a Redis restart, or the load of its append-only file.
REDIS_RETRIES = 5
#: Seconds an operation keeps trying while Redis is unreachable before it raises QueueError.
OUTAGE_S = 60.0
_RETRY_ON = [redis_errors.ConnectionError, redis_errors.TimeoutError]
#: What "Redis is unreachable" looks like (BusyLoadingError, "Redis is loading the dataset in
#: memory", is a ConnectionError).
UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

T = TypeVar("T")


class OutageClock:
    """Seconds the operations of one task spent waiting for an unreachable Redis.

    A stage's deadline leaves this time out (``workers.runtime.policy.within``): a stage that waited
    through a Redis restart is not slow, and must not be failed or retried for it.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = None
        self._waiting = 0

    def begin(self) -> None:
        if self._waiting == 0:
            self._since = time.monotonic()
        self._waiting += 1

    def end(self) -> None:
        self._waiting -= 1
        if self._waiting == 0 and self._since is not None:
            self.total += time.monotonic() - self._since
            self._since = None

    def waited(self) -> float:
        """Seconds spent waiting so far, counting a wait still under way."""
        return self.total + (time.monotonic() - self._since if self._since is not None else 0.0)


#: The clock that ``retrying`` adds its waits to in this task (None: nobody is counting).
OUTAGE_CLOCK: ContextVar[OutageClock | None] = ContextVar("vtp_outage_clock", default=None)


def redis_retry(retries: int = REDIS_RETRIES) -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)


def redis_location(url: str) -> str:
    """``host:port/db`` of a Redis URL, without credentials (for messages)."""
    u = urlparse(url)
    return f"{u.hostname or 'localhost'}:{u.port or 6379}{u.path if u.path not in ('', '/') else '/0'}"


def connect(url: str, *, retries: int = REDIS_RETRIES) -> aioredis.Redis:
    """A redis.asyncio client with vtp's retry policy (not connected until first used)."""
    return aioredis.Redis.from_url(
        url, retry=redis_retry(retries), retry_on_error=list(_RETRY_ON), socket_connect_timeout=2
    )


async def retrying(op: Callable[[], Awaitable[T]], *, where: str, outage_s: float = OUTAGE_S) -> T:
    """Run a Redis operation, trying again with backoff while Redis is unreachable, for up to
    ``outage_s`` seconds; then ``QueueError("cannot reach Redis at ...")``. Any other Redis
    error is a ``QueueError`` at once. Operations must be safe to repeat (JobStore's are)."""
    started = time.monotonic()
    pause = 0.05
    clock = None
    try:
        while True:
            try:
                return await op()
            except UNREACHABLE as exc:
                if time.monotonic() - started >= outage_s:
                    raise errors.QueueError(f"cannot reach Redis at {where}: {exc}") from exc
                if clock is None and (clock := OUTAGE_CLOCK.get()) is not None:
                    clock.begin()
                await anyio.sleep(pause)
                pause = min(pause * 2, 1.0)
            except redis_errors.RedisError as exc:
                raise errors.QueueError(f"Redis at {where} failed: {exc}") from exc
    finally:
        if clock is not None:
            clock.end()


def check_transition(job_id: str, current: str, to: str) -> None:
    """Raise ``JobError`` (``JobCancelled`` for a cancelled job) unless ``current -> to`` is allowed."""
    if current == dag.CANCELLED:
        raise errors.JobCancelled(f"job {job_id} was cancelled")
    if current in TERMINAL_STATES:
        raise errors.JobError(f"job {job_id} is already {current}")
    if to == current or to in (dag.FAILED, dag.CANCELLED):
        return
    if to not in dag.NEXT_STATES.get(current, ()):
        raise errors.JobError(f"job {job_id}: invalid transition {current} -> {to}")


def options_digest(options: TranscribeOptions) -> str:
    """Same options, same digest (msgspec encodes fields in declaration order)."""
    return hashlib.sha256(encode(options)).hexdigest()[:24]


def event_of(record: JobRecord, message: str = "") -> ProgressEvent:
    return ProgressEvent(
        job_id=record.id,
        state=record.state,
        chunks_done=record.chunks_done,
        chunks_total=record.chunks_total,
        audio_done=round(record.audio_done, 3),
        audio_total=round(record.audio_total, 3),
        message=message or record.error,
    )


def _mapped(fn):
    """Retry through Redis outages; Redis failures become ``QueueError`` naming the server."""

    @wraps(fn)
    async def wrapper(self: JobStore, *args, **kwargs):
        return await retrying(lambda: fn(self, *args, **kwargs), where=self.where, outage_s=self.outage_s)

    return wrapper


# Fan-in: record one batch's result and count it down, once per batch index however often the
# batch runs (a retried or duplicated transcribe job finds its index in `finished` and changes
# nothing). Returns {batches left, chunks done, audio seconds done (a string: Lua truncates
# numbers to integers)}; -1 batches left means the fan-out was never set up (or has expired).
#
# Like every write of scratch state (``_DAG_WRITE``), only while the job's record exists (-2
# batches left otherwise: the job was deleted), and the keys written never outlive the record.
_FAN_IN = """
if redis.call('EXISTS', KEYS[5]) == 0 then return {-2, 0, '0'} end
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[4], 'chunks', ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[4], 'audio', ARGV[4])
  redis.call('DECR', KEYS[3])
end
local ttl = redis.call('PTTL', KEYS[5])
if ttl > 0 then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
local left = redis.call('GET', KEYS[3])
return {tonumber(left or '-1'), tonumber(redis.call('HGET', KEYS[4], 'chunks') or '0'),
        redis.call('HGET', KEYS[4], 'audio') or '0'}
"""

# One write of a job's scratch state (KEYS[2]): the command ARGV[1] with the arguments after it,
# run only while the job's record (KEYS[1]) exists, so a stage still in flight when its job is
# deleted (cancel, then DELETE) cannot bring the deleted state back; and a key written after
# the job ended expires with its record, never later. {1, reply}, or {0} when the job is gone.
_DAG_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local reply = redis.call(ARGV[1], KEYS[2], unpack(ARGV, 2))
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return {1, reply}
"""


@dataclass(frozen=True)
class FanIn:
    """What recording one batch left: when ``batches_left`` is 0 every batch is in."""

    batches_left: int
    chunks_done: int
    audio_done: float


class JobStore:
    def __init__(
        self, redis: aioredis.Redis, *, result_ttl: int = 7 * 24 * 3600, where: str = "", outage_s: float = OUTAGE_S
    ) -> None:
        self.redis = redis
        self.result_ttl = result_ttl
        self.outage_s = outage_s
        if not where:
            kw = redis.connection_pool.connection_kwargs
            where = f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
        self.where = where
        self._fan_in = redis.register_script(_FAN_IN)
        self._dag_write = redis.register_script(_DAG_WRITE)

    @classmethod
    def open(cls, url: str, *, result_ttl: int = 7 * 24 * 3600, outage_s: float = OUTAGE_S) -> JobStore:
        return cls(connect(url), result_ttl=result_ttl, where=redis_location(url), outage_s=outage_s)

    async def aclose(self) -> None:
        await self.redis.aclose()

    @_mapped
    async def ping(self) -> None:
        await self.redis.ping()

    @_mapped
    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (None where CONFIG is disabled, as on some managed Redis)."""
        try:
            reply = await self.redis.config_get("maxmemory-policy")
        except redis_errors.ResponseError:
            return None
        value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    # -- records --------------------------------------------------------------------------

    @_mapped
    async def create(self, record: JobRecord, *, join: bool = False) -> tuple[JobRecord, bool]:
        """Store a new ``queued`` record; ``(record, True)``.

        With ``record.idempotency_key``, a second create with the same owner and key returns
        the first job's record and False instead. With ``join`` (and ``record.sha256``), so
        does a create while a job of the same owner with the same media and options is queued,
        running or done (``find_reusable``): a retried request joins the job instead of
        repeating its work. The keys and the record are written in one MULTI, watched on the
        keys: whoever sees a key sees its record, so concurrent submits agree on one winner (a
        key whose record has expired, failed or was cancelled is free again).
        """
        now = time.time()
        record = msgspec.structs.replace(record, state=dag.QUEUED, created_at=now, updated_at=now, state_since=now)
        key = constants.job_key(record.id)
        idem = f"{constants.IDEMPOTENCY_PREFIX}{record.owner}:{record.idempotency_key}" if record.idempotency_key else None
        same = self._sha_key(record.owner, record.sha256, record.options) if join and record.sha256 else None

        async def attempt(pipe) -> tuple[JobRecord, bool]:
            mine = await pipe.get(key)
            if mine is not None:  # a repeat whose reply was lost: it is in, counted once
                return decode(mine, JobRecord), True
            if idem is not None:
                holder = await pipe.get(idem)
                if holder is not None:
                    existing = await pipe.get(constants.job_key(holder.decode()))
                    if existing is not None:
                        return decode(existing, JobRecord), False
            if same is not None:
                holder = await pipe.get(same)
                if holder is not None:
                    existing = await pipe.get(constants.job_key(holder.decode()))
                    if existing is not None and decode(existing, JobRecord).state not in (dag.FAILED, dag.CANCELLED):
                        return decode(existing, JobRecord), False
            pipe.multi()
            if idem is not None:
                pipe.set(idem, record.id, ex=self.result_ttl)
            if same is not None:
                pipe.set(same, record.id, ex=self.result_ttl)
            pipe.set(key, encode(record))
            pipe.zadd(constants.JOBS_INDEX, {record.id: now})
            pipe.zadd(constants.owner_jobs_key(record.owner), {record.id: now})
            pipe.zadd(constants.ACTIVE_INDEX, {record.id: now})
            pipe.hincrby(constants.STATS_KEY, "state:queued", 1)
            self._queue_event(pipe, event_of(record))
            return record, True

        watch = tuple(k for k in (key, idem, same) if k is not None)
        return await self.redis.transaction(attempt, *watch, value_from_callable=True)

    @_mapped
    async def find_by_key(self, owner: str, idempotency_key: str) -> JobRecord | None:
        job_id = await self.redis.get(f"{constants.IDEMPOTENCY_PREFIX}{owner}:{idempotency_key}")
        return None if job_id is None else await self.find(job_id.decode())

    @_mapped
    async def find(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(constants.job_key(job_id))
        return None if raw is None else decode(raw, JobRecord)

    async def get(self, job_id: str) -> JobRecord:
        record = await self.find(job_id)
        if record is None:
            raise errors.JobNotFound(f"no job {job_id!r} (unknown id, or its record has expired)")
        return record

    @_mapped
    async def list_ids(self, limit: int = 50) -> list[str]:
        """Newest first."""
        return [i.decode() for i in await self.redis.zrevrange(constants.JOBS_INDEX, 0, limit - 1)]

    @_mapped
    async def list_owned(self, owner: str, *, offset: int = 0, limit: int = 20) -> tuple[list[JobRecord], int | None]:
        """One owner's jobs, newest first, and the offset of the next page (None: no more).
        Ids whose records have expired are dropped from the owner's index on the way."""
        key = constants.owner_jobs_key(owner)
        ids = [i.decode() for i in await self.redis.zrevrange(key, offset, offset + limit - 1)]
        raws = await self.redis.mget([constants.job_key(i) for i in ids]) if ids else []
        gone = [i for i, raw in zip(ids, raws) if raw is None]
        if gone:
            await self.redis.zrem(key, *gone)
        records = [decode(raw, JobRecord) for raw in raws if raw is not None]
        more = len(ids) == limit and await self.redis.zcard(key) > offset + limit - len(gone)
        return records, (offset + limit - len(gone)) if more else None

    @_mapped
    async def delete(self, record: JobRecord) -> None:
        """Forget a finished job: its record, events, scratch state and index entries. A stage
        still running for it (a cancelled job's batch) writes nothing afterwards: every scratch
        write needs the record (``_DAG_WRITE``). Its storage artifacts stay listed in
        ``vtp:ended``, so the sweeper deletes again, after ``VTP_RESULT_TTL``, whatever such a
        stage wrote there."""
        same = self._sha_key(record.owner, record.sha256, record.options) if record.sha256 else None
        if same is not None and await self.redis.get(same) != record.id.encode():
            same = None  # it names a newer job with the same media: keep it
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(constants.job_key(record.id), constants.events_key(record.id))
            pipe.delete(*(constants.dag_key(record.id, part) for part in DAG_PARTS))
            pipe.zrem(constants.JOBS_INDEX, record.id)
            pipe.zrem(constants.owner_jobs_key(record.owner), record.id)
            if record.idempotency_key:
                pipe.delete(f"{constants.IDEMPOTENCY_PREFIX}{record.owner}:{record.idempotency_key}")
            if same is not None:
                pipe.delete(same)
            await pipe.execute()

    @_mapped
    async def set_webhook(self, job_id: str, delivery: msgspec.Struct) -> JobRecord | None:
        """Record a webhook's delivery state on a finished job (no progress event)."""

        def change(rec: JobRecord) -> JobRecord | None:
            return msgspec.structs.replace(rec, webhook=delivery)

        return await self._update(job_id, change, publish=False)

    async def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        message: str = "",
        publish: bool = True,
    ) -> JobRecord | None:
        """Apply ``change`` atomically (WATCH/MULTI, retried on conflict) and publish the result.

        ``change`` returns the new record; the very record it was given to write nothing and
        return it; or None to write nothing and return None.
        """
        key = constants.job_key(job_id)

        async def attempt(pipe) -> JobRecord | None:
            raw = await pipe.get(key)
            if raw is None:
                raise errors.JobNotFound(f"no job {job_id!r} (unknown id, or its record has expired)")
            old = decode(raw, JobRecord)
            new = change(old)
            if new is None or new is old:
                return new
            new = msgspec.structs.replace(new, updated_at=time.time())
            pipe.multi()
            pipe.set(key, encode(new))
            if new.state != old.state:
                self._queue_counts(pipe, old, new)
            if publish:
                self._queue_event(pipe, event_of(new, message))
            if new.terminal:
                self._queue_expiry(pipe, new)
                if new.webhook_url and not old.terminal:  # every end notifies (workers/sweeper.py)
                    pipe.sadd(constants.WEBHOOKS_DUE, job_id)
            return new

        return await self.redis.transaction(attempt, key, value_from_callable=True)

    def _queue_event(self, pipe, event: ProgressEvent) -> None:
        key = constants.events_key(event.job_id)
        pipe.xadd(key, {_EVENT_FIELD: encode(event)}, maxlen=_STREAM_MAXLEN, approximate=True)
        pipe.expire(key, self.result_ttl)

    def _queue_counts(self, pipe, old: JobRecord, new: JobRecord) -> None:
        """The counters ``/metrics`` shows, moved in the same MULTI as the record: exactly once
        per state change. ``state:<s>`` is the number of jobs in ``s`` now for the states before
        the end, and the number that ever ended so for done, failed and cancelled; a done job
        adds its media seconds and its seconds in each stage."""
        pipe.hincrby(constants.STATS_KEY, f"state:{old.state}", -1)
        pipe.hincrby(constants.STATS_KEY, f"state:{new.state}", 1)
        if new.state == dag.DONE:
            pipe.hincrbyfloat(constants.STATS_KEY, "audio_seconds", new.duration)
            for stage, seconds in new.timings.items():
                pipe.hincrbyfloat(constants.STATS_KEY, f"stage_seconds:{stage}", seconds)
                pipe.hincrby(constants.STATS_KEY, f"stage_count:{stage}", 1)

    @_mapped
    async def stats(self) -> dict[str, float]:
        """The counters of ``_queue_counts`` (one HGETALL, however many jobs there are)."""
        raw = await self.redis.hgetall(constants.STATS_KEY)
        return {k.decode(): float(v) for k, v in raw.items()}

    def _queue_expiry(self, pipe, record: JobRecord) -> None:
        """A finished job's keys live ``result_ttl`` more seconds, then Redis drops them."""
        pipe.expire(constants.job_key(record.id), self.result_ttl)
        pipe.zrem(constants.ACTIVE_INDEX, record.id)
        pipe.zadd(constants.ENDED_INDEX, {record.id: record.finished_at or time.time()})
        for part in DAG_PARTS:
            pipe.expire(constants.dag_key(record.id, part), self.result_ttl)
        if record.idempotency_key:
            pipe.expire(f"{constants.IDEMPOTENCY_PREFIX}{record.owner}:{record.idempotency_key}", self.result_ttl)

    @_mapped
    async def transition(
        self, job_id: str, to: Stage, *, expect: Stage | None = None, message: str = "", **changes: Any
    ) -> JobRecord | None:
        """Move the job to state ``to`` (validated), setting ``changes`` on the record too.

        Time spent in the state being left is added to ``timings``. With ``expect``, the
        transition only happens if the job is in that state right now (None is returned
        otherwise, and nothing changes): for moves that another worker may already have made.
        """

        def change(rec: JobRecord) -> JobRecord | None:
            if expect is not None and rec.state != expect:
                return None
            check_transition(job_id, rec.state, to)
            now = time.time()
            if to == rec.state:
                return msgspec.structs.replace(rec, **changes) if changes else rec
            timings = dict(rec.timings)
            label = dag.LABEL.get(rec.state)
            if label:
                timings[label] = round(timings.get(label, 0.0) + now - rec.state_since, 3)
            extra: dict[str, Any] = {}
            if to in TERMINAL_STATES:
                extra["finished_at"] = now
            return msgspec.structs.replace(rec, state=to, state_since=now, timings=timings, **extra, **changes)

        return await self._update(job_id, change, message=message)

    @_mapped
    async def note(self, job_id: str, **changes: Any) -> JobRecord | None:
        """Set fields that are not the state (duration, waits...) on a job that is not final."""

        def change(rec: JobRecord) -> JobRecord | None:
            return None if rec.terminal else msgspec.structs.replace(rec, **changes)

        return await self._update(job_id, change)

    @_mapped
    async def settle_language(self, job_id: str, language: str) -> str:
        """The job's language: ``language`` if none was recorded yet, else the one recorded
        (first writer wins), so every batch of a job decodes in one language however many GPU
        workers detected it at once."""

        def change(rec: JobRecord) -> JobRecord | None:
            return rec if rec.language or rec.terminal else msgspec.structs.replace(rec, language=language)

        record = await self._update(job_id, change, publish=False)
        return (record.language if record is not None else "") or language

    @_mapped
    async def note_wait(self, job_id: str, stage: str, seconds: float) -> None:
        """Remember how long a stage's job waited in its queue (the longest, for the fan-out)."""

        def change(rec: JobRecord) -> JobRecord | None:
            if rec.terminal or rec.waits.get(stage, -1.0) >= seconds:
                return None
            return msgspec.structs.replace(rec, waits={**rec.waits, stage: round(seconds, 4)})

        await self._update(job_id, change, publish=False)

    @_mapped
    async def progress(self, job_id: str, *, chunks_done: int, audio_done: float) -> JobRecord | None:
        """Record absolute progress; it only moves forward (two GPU workers may report out of order)."""

        def change(rec: JobRecord) -> JobRecord | None:
            if rec.terminal or (chunks_done <= rec.chunks_done and audio_done <= rec.audio_done):
                return None
            return msgspec.structs.replace(
                rec,
                chunks_done=max(rec.chunks_done, chunks_done),
                audio_done=round(max(rec.audio_done, audio_done), 3),
            )

        return await self._update(job_id, change)

    @_mapped
    async def stage_progress(self, job_id: str, state: Stage, *, audio_done: float, audio_total: float) -> bool:
        """Publish how far a long stage (extract, segment) has got in seconds of the input's
        audio. Only an event: the record's ``audio_done``/``audio_total`` count *speech* and
        only move forward. False, and nothing published, once the job has ended (cancelled:
        the stage can stop early)."""
        raw = await self.redis.get(constants.job_key(job_id))
        if raw is None or decode(raw, JobRecord).terminal:
            return False
        event = ProgressEvent(job_id=job_id, state=state, audio_done=round(audio_done, 3), audio_total=round(audio_total, 3))
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_event(pipe, event)
            await pipe.execute()
        return True

    @_mapped
    async def fail(self, job_id: str, reason: str) -> bool:
        """End the job ``failed`` with a one-line reason; False if it had already ended."""

        def change(rec: JobRecord) -> JobRecord | None:
            if rec.terminal:
                return None
            return msgspec.structs.replace(
                rec, state=dag.FAILED, error=reason, finished_at=time.time(), timings=_closed_timings(rec)
            )

        return await self._update(job_id, change, message=reason) is not None

    @_mapped
    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job that has not ended: every stage that starts after this returns at once."""

        def change(rec: JobRecord) -> JobRecord | None:
            check_transition(job_id, rec.state, dag.CANCELLED)
            return msgspec.structs.replace(
                rec, state=dag.CANCELLED, error="cancelled", finished_at=time.time(), timings=_closed_timings(rec)
            )

        record = await self._update(job_id, change, message="cancelled")
        assert record is not None
        return record

    # -- identical media ----------------------------------------------------------------------

    def _sha_key(self, owner: str, sha256: str, options: TranscribeOptions) -> str:
        return f"{constants.SHA_PREFIX}{owner}:{sha256}:{options_digest(options)}"

    @_mapped
    async def find_reusable(self, owner: str, sha256: str, options: TranscribeOptions) -> JobRecord | None:
        """A job of the same owner with the same media bytes and the same options that is
        ``done``, or still queued or running (created with ``join``): not a failed or
        cancelled one."""
        job_id = await self.redis.get(self._sha_key(owner, sha256, options))
        if job_id is None:
            return None
        record = await self.find(job_id.decode())
        return record if record is not None and record.state not in (dag.FAILED, dag.CANCELLED) else None

    @_mapped
    async def remember_done(self, record: JobRecord) -> None:
        if record.sha256 and record.state == dag.DONE:
            key = self._sha_key(record.owner, record.sha256, record.options)
            await self.redis.set(key, record.id, ex=self.result_ttl)

    # -- events ---------------------------------------------------------------------------

    @_mapped
    async def publish(self, event: ProgressEvent) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_event(pipe, event)
            await pipe.execute()

    async def events(
        self, job_id: str, *, since: str = "0-0", poll_s: float = 1.0, reconnect_s: float = 90.0,
        stall_s: float | None = None, idle: bool = False,
    ) -> AsyncIterator[ProgressEvent | None]:
        """The job's events from ``since`` (all of them by default), ending with its final one.

        Survives Redis going away for up to ``reconnect_s`` seconds (it reads on from the last
        event it saw); raises ``QueueError`` after that, ``JobNotFound`` for an unknown job.
        With ``stall_s``, raises ``JobStalled`` once the job has shown no progress for that long:
        no change to its record and no worker renewing a lease on one of its stages. With
        ``idle``, yields None after every ``poll_s`` without an event (an SSE keep-alive).

        Each read blocks in Redis for ``poll_s``: that must be shorter than the client's socket
        timeout, or a quiet job's read times out as if Redis were gone.
        """
        key = constants.events_key(job_id)
        last: str | bytes = since
        lost_at: float | None = None
        started = time.time()
        while True:
            try:
                reply = await self.redis.xread({key: last}, count=200, block=max(int(poll_s * 1000), 1))
                record = None if reply else await self.find(job_id)
                lost_at = None
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, errors.QueueError) as exc:
                now = time.monotonic()
                lost_at = lost_at or now
                if now - lost_at > reconnect_s:
                    raise errors.QueueError(f"cannot reach Redis at {self.where}: {exc}") from exc
                await anyio.sleep(0.5)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    event = decode(fields[_EVENT_FIELD], ProgressEvent)
                    yield event
                    if event.state in TERMINAL_STATES:
                        return
            if not reply:
                if record is None:
                    raise errors.JobNotFound(f"no job {job_id!r} (unknown id, or its record has expired)")
                if record.terminal:  # its final event was trimmed or expired: the record says it all
                    yield event_of(record)
                    return
                if stall_s is not None:
                    await self._check_stalled(record, started, stall_s)
                if idle:
                    yield None

    async def _check_stalled(self, record: JobRecord, started: float, stall_s: float) -> None:
        now = time.time()
        if now - max(record.updated_at, started) < stall_s:
            return
        beat = await self.last_beat(record.id)
        if beat is not None and now - beat < stall_s:
            return  # a worker is on one of its stages
        idle = now - max(record.updated_at, started, beat or 0.0)
        queue = dag.RUNS_IN[record.state].queue if record.state in dag.RUNS_IN else "cpu"
        raise errors.JobStalled(
            f"job {record.id} stopped moving: no progress for {idle:.0f} s while {record.state}"
            f" (is a `vtp worker --queue {queue}` running? `vtp status {record.id}` shows where it is)"
        )

    async def wait(
        self, job_id: str, on_event: Callable[[ProgressEvent], None] | None = None, *, stall_s: float | None = None
    ) -> JobRecord:
        """Follow the job's events until it ends; its final record. With ``stall_s``, ``JobStalled``
        once the job shows no progress for that long (see ``events``)."""
        async for event in self.events(job_id, stall_s=stall_s):
            if on_event is not None:
                on_event(event)
        return await self.get(job_id)

    # -- DAG scratch state (used by workers/runtime/tasks.py) ----------------------------------

    async def _write_part(self, job_id: str, part: str, *command: Any) -> Any:
        """Run ``command`` on the job's scratch key ``part`` while its record exists (see
        ``_DAG_WRITE``); ``JobNotFound`` once the job is gone (deleted, or expired)."""
        reply = await self._dag_write(keys=[constants.job_key(job_id), constants.dag_key(job_id, part)], args=list(command))
        if not reply or reply[0] == 0:
            raise errors.JobNotFound(f"no job {job_id!r} (deleted, or its record has expired)")
        return reply[1] if len(reply) > 1 else None

    @_mapped
    async def put_part(self, job_id: str, part: str, message: msgspec.Struct) -> None:
        await self._write_part(job_id, part, "SET", encode(message))

    @_mapped
    async def get_part(self, job_id: str, part: str, type_: type) -> Any:
        raw = await self.redis.get(constants.dag_key(job_id, part))
        if raw is None:
            raise errors.JobError(f"job {job_id}: its {part} is missing from Redis (expired or flushed)")
        return decode(raw, type_)

    @_mapped
    async def start_fan_out(self, job_id: str, batches: int) -> None:
        """Set the count of batches to wait for; a second call (a retried segment) keeps the first."""
        await self._write_part(job_id, "pending", "SET", batches, "NX")

    @_mapped
    async def record_batch(self, job_id: str, part: BatchTranscript, chunks: int) -> FanIn:
        """Store one batch's result and count it down, exactly once per batch index."""
        keys = [constants.dag_key(job_id, p) for p in ("finished", "parts", "pending", "done")]
        left, chunks_done, audio_done = await self._fan_in(
            keys=[*keys, constants.job_key(job_id)], args=[part.batch_index, encode(part), chunks, part.audio_seconds]
        )
        if left == -2:
            raise errors.JobNotFound(f"no job {job_id!r} (deleted, or its record has expired)")
        if left < 0:
            raise errors.JobError(f"job {job_id}: its fan-out state is missing from Redis (expired or flushed)")
        return FanIn(int(left), int(chunks_done), float(audio_done))

    @_mapped
    async def batch_parts(self, job_id: str) -> list[BatchTranscript]:
        raw = await self.redis.hgetall(constants.dag_key(job_id, "parts"))
        return sorted((decode(v, BatchTranscript) for v in raw.values()), key=lambda p: p.batch_index)

    @_mapped
    async def count_run(self, job_id: str, stage: str) -> None:
        """Count a stage whose work is complete, just before it hands on to the next stage (so
        the count is in before the job can be seen ``done``); tests check that nothing ran
        twice to completion."""
        await self._write_part(job_id, "runs", "HINCRBY", stage, 1)

    @_mapped
    async def add_usage(self, job_id: str, stage: str, seconds: float, cost_usd: float) -> None:
        """Add a stage's machine time and its cost to the record (every try counts: the machine
        was busy either way); also on a job that has ended, whose last stages may finish after it."""

        def change(rec: JobRecord) -> JobRecord:
            used = {**rec.machine_seconds, stage: round(rec.machine_seconds.get(stage, 0.0) + seconds, 3)}
            return msgspec.structs.replace(rec, machine_seconds=used, cost_usd=round(rec.cost_usd + cost_usd, 6))

        await self._update(job_id, change, publish=False)

    @_mapped
    async def runs(self, job_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(constants.dag_key(job_id, "runs"))
        return {k.decode(): int(v) for k, v in raw.items()}

    # -- liveness and housekeeping (used by workers/sweeper.py and `submit --wait`) -----------

    @_mapped
    async def active_ids(self, limit: int = 10000) -> list[str]:
        """Jobs that have not ended, oldest first."""
        return [i.decode() for i in await self.redis.zrange(constants.ACTIVE_INDEX, 0, limit - 1)]

    @_mapped
    async def forget_active(self, job_id: str) -> None:
        """Drop a job from the active index (it ended, or its record is gone)."""
        await self.redis.zrem(constants.ACTIVE_INDEX, job_id)

    @_mapped
    async def ended_before(self, cutoff: float, limit: int = 500) -> list[str]:
        """Jobs that ended before ``cutoff`` (Unix time) and whose artifacts are still kept."""
        raw = await self.redis.zrangebyscore(constants.ENDED_INDEX, "-inf", cutoff, start=0, num=limit)
        return [i.decode() for i in raw]

    @_mapped
    async def forget_ended(self, job_id: str) -> None:
        """The job's artifacts are gone: drop it from the ended and listing indexes."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(constants.ENDED_INDEX, job_id)
            pipe.zrem(constants.JOBS_INDEX, job_id)
            await pipe.execute()

    @_mapped
    async def claim_sweep(self, token: str, ttl_ms: int) -> bool:
        """Take the sweeper's lock unless another worker holds it (it expires, never released)."""
        return bool(await self.redis.set(constants.SWEEP_LOCK, token, nx=True, px=ttl_ms))

    @_mapped
    async def has_part(self, job_id: str, part: str) -> bool:
        return bool(await self.redis.exists(constants.dag_key(job_id, part)))

    @_mapped
    async def finished_batches(self, job_id: str) -> set[int]:
        """Indexes of the batches whose results are in."""
        return {int(i) for i in await self.redis.smembers(constants.dag_key(job_id, "finished"))}

    @_mapped
    async def count_redrive(self, job_id: str, state: str) -> int:
        """Count one re-drive of the job's ``state`` by the sweeper; the count so far."""
        return int(await self._write_part(job_id, "redrives", "HINCRBY", state, 1))

    @_mapped
    async def redrives(self, job_id: str) -> dict[str, int]:
        """state -> times the sweeper re-drove the job in that state."""
        raw = await self.redis.hgetall(constants.dag_key(job_id, "redrives"))
        return {k.decode(): int(v) for k, v in raw.items()}

    @_mapped
    async def webhooks_due(self, limit: int = 1000) -> list[str]:
        """Ended jobs whose webhook is still to be queued (``constants.WEBHOOKS_DUE``)."""
        return [i.decode() for i in await self.redis.srandmember(constants.WEBHOOKS_DUE, limit) or []]

    @_mapped
    async def webhook_queued(self, job_id: str) -> None:
        await self.redis.srem(constants.WEBHOOKS_DUE, job_id)

    @_mapped
    async def last_beat(self, job_id: str) -> float | None:
        """When a worker last renewed its lease on one of the job's stages (None: no live stage)."""
        raw = await self.redis.get(constants.beat_key(job_id))
        return None if raw is None else float(raw)


def _closed_timings(rec: JobRecord) -> dict[str, float]:
    timings = dict(rec.timings)
    label = dag.LABEL.get(rec.state)
    if label:
        timings[label] = round(timings.get(label, 0.0) + time.time() - rec.state_since, 3)
    return timings
