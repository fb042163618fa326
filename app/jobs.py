"""Distributed jobs in Redis: ``JobStore``, the job records and their state changes.

``JobStore`` is the only code that reads or writes vtp's Redis keys (``app.constants``); the
CLI, the arq workers and the web process all go through it. Its parts live beside it: riding out
Redis outages (``app.redis_outage``), progress events (``app.job_events``, the ``JobEvents``
half), a running job's scratch state and the fan-in (``app.dag_state``, the ``DagScratch``
half), and the state machine itself (``app.dag.check_transition``). Every record update is a
WATCH/MULTI read-modify-write of the msgpack record, with the matching ``ProgressEvent``
appended to the job's event stream in the same transaction, so a reader never sees a state
without its event or the other way round.

State machine (``check_transition``; the states and edges come from the DAG table, ``app.dag``)::

    queued -> extracting -> segmenting -> transcribing -> merging -> rendering -> done
                                     \\________________________/ (no speech: no batches)
    any state before done -> failed | cancelled;   done, failed, cancelled are final

Re-entering the current state is allowed and changes nothing: that is what a retried stage does.

Events are a Redis *stream* per job (``app.job_events``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from app import constants, dag, errors
from app.dag import check_transition
from app.dag_state import _DAG_WRITE, _FAN_IN, DAG_PARTS, DagScratch
from app.job_events import JobEvents, event_of, queue_event
from app.messages import TERMINAL_STATES, JobRecord, ProgressEvent, Stage, TranscribeOptions, decode, encode
from app.redis_outage import OUTAGE_S, connect, redis_location, redis_op


def options_digest(options: TranscribeOptions) -> str:
    """Same options, same digest (msgspec encodes fields in declaration order)."""
    return hashlib.sha256(encode(options)).hexdigest()[:24]


class JobStore(JobEvents, DagScratch):
    """Job records in Redis, with their events (``JobEvents``) and scratch state (``DagScratch``)."""

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

    @redis_op
    async def ping(self) -> None:
        await self.redis.ping()

    @redis_op
    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (None where CONFIG is disabled, as on some managed Redis)."""
        try:
            reply = await self.redis.config_get("maxmemory-policy")
        except redis_errors.ResponseError:
            return None
        value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    # -- records --------------------------------------------------------------------------

    @redis_op
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
            queue_event(pipe, event_of(record), self.result_ttl)
            return record, True

        watch = tuple(k for k in (key, idem, same) if k is not None)
        return await self.redis.transaction(attempt, *watch, value_from_callable=True)

    @redis_op
    async def find_by_key(self, owner: str, idempotency_key: str) -> JobRecord | None:
        job_id = await self.redis.get(f"{constants.IDEMPOTENCY_PREFIX}{owner}:{idempotency_key}")
        return None if job_id is None else await self.find(job_id.decode())

    @redis_op
    async def find(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.get(constants.job_key(job_id))
        return None if raw is None else decode(raw, JobRecord)

    async def get(self, job_id: str) -> JobRecord:
        record = await self.find(job_id)
        if record is None:
            raise errors.JobNotFound(f"no job {job_id!r} (unknown id, or its record has expired)")
        return record

    @redis_op
    async def list_ids(self, limit: int = 50) -> list[str]:
        """Newest first."""
        return [i.decode() for i in await self.redis.zrevrange(constants.JOBS_INDEX, 0, limit - 1)]

    @redis_op
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

    @redis_op
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

    @redis_op
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
                queue_event(pipe, event_of(new, message), self.result_ttl)
            if new.terminal:
                self._queue_expiry(pipe, new)
                if new.webhook_url and not old.terminal:  # every end notifies (workers/sweeper.py)
                    pipe.sadd(constants.WEBHOOKS_DUE, job_id)
            return new

        return await self.redis.transaction(attempt, key, value_from_callable=True)

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

    @redis_op
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

    @redis_op
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

    @redis_op
    async def note(self, job_id: str, **changes: Any) -> JobRecord | None:
        """Set fields that are not the state (duration, waits...) on a job that is not final."""

        def change(rec: JobRecord) -> JobRecord | None:
            return None if rec.terminal else msgspec.structs.replace(rec, **changes)

        return await self._update(job_id, change)

    @redis_op
    async def settle_language(self, job_id: str, language: str) -> str:
        """The job's language: ``language`` if none was recorded yet, else the one recorded
        (first writer wins), so every batch of a job decodes in one language however many GPU
        workers detected it at once."""

        def change(rec: JobRecord) -> JobRecord | None:
            return rec if rec.language or rec.terminal else msgspec.structs.replace(rec, language=language)

        record = await self._update(job_id, change, publish=False)
        return (record.language if record is not None else "") or language

    @redis_op
    async def note_wait(self, job_id: str, stage: str, seconds: float) -> None:
        """Remember how long a stage's job waited in its queue (the longest, for the fan-out)."""

        def change(rec: JobRecord) -> JobRecord | None:
            if rec.terminal or rec.waits.get(stage, -1.0) >= seconds:
                return None
            return msgspec.structs.replace(rec, waits={**rec.waits, stage: round(seconds, 4)})

        await self._update(job_id, change, publish=False)

    @redis_op
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

    @redis_op
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
            queue_event(pipe, event, self.result_ttl)
            await pipe.execute()
        return True

    @redis_op
    async def fail(self, job_id: str, reason: str) -> bool:
        """End the job ``failed`` with a one-line reason; False if it had already ended."""

        def change(rec: JobRecord) -> JobRecord | None:
            if rec.terminal:
                return None
            return msgspec.structs.replace(
                rec, state=dag.FAILED, error=reason, finished_at=time.time(), timings=_closed_timings(rec)
            )

        return await self._update(job_id, change, message=reason) is not None

    @redis_op
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

    @redis_op
    async def find_reusable(self, owner: str, sha256: str, options: TranscribeOptions) -> JobRecord | None:
        """A job of the same owner with the same media bytes and the same options that is
        ``done``, or still queued or running (created with ``join``): not a failed or
        cancelled one."""
        job_id = await self.redis.get(self._sha_key(owner, sha256, options))
        if job_id is None:
            return None
        record = await self.find(job_id.decode())
        return record if record is not None and record.state not in (dag.FAILED, dag.CANCELLED) else None

    @redis_op
    async def remember_done(self, record: JobRecord) -> None:
        if record.sha256 and record.state == dag.DONE:
            key = self._sha_key(record.owner, record.sha256, record.options)
            await self.redis.set(key, record.id, ex=self.result_ttl)

    # -- events ---------------------------------------------------------------------------


    # -- DAG scratch state (used by workers/runtime/tasks.py) ----------------------------------


    @redis_op
    async def add_usage(self, job_id: str, stage: str, seconds: float, cost_usd: float) -> None:
        """Add a stage's machine time and its cost to the record (every try counts: the machine
        was busy either way); also on a job that has ended, whose last stages may finish after it."""

        def change(rec: JobRecord) -> JobRecord:
            used = {**rec.machine_seconds, stage: round(rec.machine_seconds.get(stage, 0.0) + seconds, 3)}
            return msgspec.structs.replace(rec, machine_seconds=used, cost_usd=round(rec.cost_usd + cost_usd, 6))

        await self._update(job_id, change, publish=False)


    # -- liveness and housekeeping (used by workers/sweeper.py and `submit --wait`) -----------

    @redis_op
    async def active_ids(self, limit: int = 10000) -> list[str]:
        """Jobs that have not ended, oldest first."""
        return [i.decode() for i in await self.redis.zrange(constants.ACTIVE_INDEX, 0, limit - 1)]

    @redis_op
    async def forget_active(self, job_id: str) -> None:
        """Drop a job from the active index (it ended, or its record is gone)."""
        await self.redis.zrem(constants.ACTIVE_INDEX, job_id)

    @redis_op
    async def ended_before(self, cutoff: float, limit: int = 500) -> list[str]:
        """Jobs that ended before ``cutoff`` (Unix time) and whose artifacts are still kept."""
        raw = await self.redis.zrangebyscore(constants.ENDED_INDEX, "-inf", cutoff, start=0, num=limit)
        return [i.decode() for i in raw]

    @redis_op
    async def forget_ended(self, job_id: str) -> None:
        """The job's artifacts are gone: drop it from the ended and listing indexes."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(constants.ENDED_INDEX, job_id)
            pipe.zrem(constants.JOBS_INDEX, job_id)
            await pipe.execute()

    @redis_op
    async def claim_sweep(self, token: str, ttl_ms: int) -> bool:
        """Take the sweeper's lock unless another worker holds it (it expires, never released)."""
        return bool(await self.redis.set(constants.SWEEP_LOCK, token, nx=True, px=ttl_ms))


    @redis_op
    async def webhooks_due(self, limit: int = 1000) -> list[str]:
        """Ended jobs whose webhook is still to be queued (``constants.WEBHOOKS_DUE``)."""
        return [i.decode() for i in await self.redis.srandmember(constants.WEBHOOKS_DUE, limit) or []]

    @redis_op
    async def webhook_queued(self, job_id: str) -> None:
        await self.redis.srem(constants.WEBHOOKS_DUE, job_id)

    @redis_op
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
