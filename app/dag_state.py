"""A running job's scratch state between stages (``vtp:dag:<id>:<part>``) and the exactly-once fan-in.

The parts (``DAG_PARTS``): the extracted audio, the segmentation, the transcript (what the
sweeper re-drives from), the fan-in's counters and batch results, the count of completed runs
of each stage and of the sweeper's re-drives. Every write goes through a Lua script that writes
only while the job's record exists and never lets the key outlive the record: a deleted or
expired job leaves no scratch state behind (``JobNotFound`` to the writer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from app import constants, errors
from app.messages import BatchTranscript, decode, encode
from app.redis_outage import redis_op

#: Scratch parts under ``vtp:dag:<id>:`` (see app.constants.DAG_PREFIX).
DAG_PARTS = ("audio", "segmentation", "pending", "finished", "parts", "done", "runs", "transcript", "redrives")

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


class DagScratch:
    """The scratch-state half of ``JobStore`` (a mixin: it uses the store's ``redis`` and the
    scripts ``JobStore`` registers, ``_fan_in`` and ``_dag_write``)."""

    async def _write_part(self, job_id: str, part: str, *command: Any) -> Any:
        """Run ``command`` on the job's scratch key ``part`` while its record exists (see
        ``_DAG_WRITE``); ``JobNotFound`` once the job is gone (deleted, or expired)."""
        reply = await self._dag_write(keys=[constants.job_key(job_id), constants.dag_key(job_id, part)], args=list(command))
        if not reply or reply[0] == 0:
            raise errors.JobNotFound(f"no job {job_id!r} (deleted, or its record has expired)")
        return reply[1] if len(reply) > 1 else None

    @redis_op
    async def put_part(self, job_id: str, part: str, message: msgspec.Struct) -> None:
        await self._write_part(job_id, part, "SET", encode(message))

    @redis_op
    async def get_part(self, job_id: str, part: str, type_: type) -> Any:
        raw = await self.redis.get(constants.dag_key(job_id, part))
        if raw is None:
            raise errors.JobError(f"job {job_id}: its {part} is missing from Redis (expired or flushed)")
        return decode(raw, type_)

    @redis_op
    async def start_fan_out(self, job_id: str, batches: int) -> None:
        """Set the count of batches to wait for; a second call (a retried segment) keeps the first."""
        await self._write_part(job_id, "pending", "SET", batches, "NX")

    @redis_op
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

    @redis_op
    async def batch_parts(self, job_id: str) -> list[BatchTranscript]:
        raw = await self.redis.hgetall(constants.dag_key(job_id, "parts"))
        return sorted((decode(v, BatchTranscript) for v in raw.values()), key=lambda p: p.batch_index)

    @redis_op
    async def count_run(self, job_id: str, stage: str) -> None:
        """Count a stage whose work is complete, just before it hands on to the next stage (so
        the count is in before the job can be seen ``done``); tests check that nothing ran
        twice to completion."""
        await self._write_part(job_id, "runs", "HINCRBY", stage, 1)

    @redis_op
    async def runs(self, job_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(constants.dag_key(job_id, "runs"))
        return {k.decode(): int(v) for k, v in raw.items()}

    @redis_op
    async def has_part(self, job_id: str, part: str) -> bool:
        return bool(await self.redis.exists(constants.dag_key(job_id, part)))

    @redis_op
    async def finished_batches(self, job_id: str) -> set[int]:
        """Indexes of the batches whose results are in."""
        return {int(i) for i in await self.redis.smembers(constants.dag_key(job_id, "finished"))}

    @redis_op
    async def count_redrive(self, job_id: str, state: str) -> int:
        """Count one re-drive of the job's ``state`` by the sweeper; the count so far."""
        return int(await self._write_part(job_id, "redrives", "HINCRBY", state, 1))

    @redis_op
    async def redrives(self, job_id: str) -> dict[str, int]:
        """state -> times the sweeper re-drove the job in that state."""
        raw = await self.redis.hgetall(constants.dag_key(job_id, "redrives"))
        return {k.decode(): int(v) for k, v in raw.items()}
