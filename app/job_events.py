"""A job's progress events: one Redis stream per job, read from any point (``JobEvents``).

Events are a Redis *stream* per job rather than pub/sub: a client that connects late, or loses
its connection while Redis restarts, reads on from the last event it saw instead of missing
the end of the job. ``JobStore`` appends each event in the same transaction as the record
change it reports (``queue_event``), so a reader never sees a state without its event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import anyio
from redis import exceptions as redis_errors

from app import constants, dag, errors
from app.messages import TERMINAL_STATES, JobRecord, ProgressEvent, decode, encode
from app.redis_outage import redis_op

_EVENT_FIELD = b"e"

_STREAM_MAXLEN = 2000


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


def queue_event(pipe, event: ProgressEvent, ttl: int) -> None:
    """Append ``event`` to its job's stream in ``pipe`` (the record's transaction); the stream
    expires ``ttl`` seconds after its last event, as the record does."""
    key = constants.events_key(event.job_id)
    pipe.xadd(key, {_EVENT_FIELD: encode(event)}, maxlen=_STREAM_MAXLEN, approximate=True)
    pipe.expire(key, ttl)


class JobEvents:
    """The event half of ``JobStore`` (a mixin: it uses the store's ``redis``, ``where``,
    ``find``, ``get`` and ``last_beat``)."""

    @redis_op
    async def publish(self, event: ProgressEvent) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            queue_event(pipe, event, self.result_ttl)
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
