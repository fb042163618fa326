"""Reading the GPU queue from Redis without arq: depth, queued audio, jobs in progress, live workers.

arq's queue is a sorted set of job ids (``vtp:gpu``); each id's payload is ``arq:job:<id>``, a
pickled dict ``{'f': function, 'a': args, ...}`` whose first argument is vtp's msgpack
``TranscribeRequest``; a started job also has ``arq:in-progress:<id>`` until it ends. A live
worker refreshes ``vtp:health:gpu:<name>`` every few seconds with arq's line
``... j_ongoing=N queued=M`` (TTL 6 s), and, while it runs stages, ``vtp:holds:gpu:<name>``
with their ids (TTL ``VTP_LEASE``, renewed with the leases).

The payload is unpickled with a loader that refuses every class (arq's payload is plain dicts,
tuples and bytes), so a key someone else wrote cannot run code in the controller.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass

import redis.asyncio as aioredis

from app import constants, errors
from app.messages import TranscribeRequest, decode
from workers.controller.decide import QueueView

#: Payloads read per tick; past that the mean of those read stands for the rest.
MAX_PAYLOADS = 2000
_ONGOING = re.compile(rb"j_ongoing=(\d+)")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ARG002 - refuse every global
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a queued job")


def batch_audio_seconds(payload: bytes) -> float:
    """Seconds of speech in one queued transcribe job (0 when it is not one)."""
    try:
        job = _PlainUnpickler(io.BytesIO(payload)).load()
        request = decode(job["a"][0], TranscribeRequest)
    except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError, errors.JobError):
        return 0.0
    return request.batch.audio_seconds


@dataclass(frozen=True)
class Health:
    """One worker: its name (the machine's), how many jobs it runs, whether its health key is
    there now, and how many stage jobs it holds a lease on (``vtp:holds:<queue>:<name>``)."""

    name: str
    running: int
    alive: bool = True
    holding: int = 0


async def read_queue(redis: aioredis.Redis, queue: str = constants.QUEUE_GPU) -> QueueView:
    ids = await redis.zrange(queue, 0, -1)
    if not ids:
        return QueueView()
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.exists(constants.ARQ_IN_PROGRESS_PREFIX + job_id.decode())
        started = await pipe.execute()
    waiting = [job_id for job_id, s in zip(ids, started) if not s]
    audio = 0.0
    if waiting:
        sample = waiting[:MAX_PAYLOADS]
        payloads = await redis.mget([constants.ARQ_JOB_PREFIX + j.decode() for j in sample])
        audio = sum(batch_audio_seconds(p) for p in payloads if p is not None)
        audio *= len(waiting) / len(sample)
    return QueueView(queued=len(waiting), queued_audio_s=round(audio, 3), in_progress=len(ids) - len(waiting))


async def read_workers(redis: aioredis.Redis, queue: str = "gpu") -> dict[str, Health]:
    """Every worker that has a health key now (``alive``) or holds a lease without one (its
    health key missed: a blip, a slow poll, a Redis restart), by name."""
    out = await live_workers(redis, queue)
    prefix = constants.holds_key(queue, "")
    keys = [k async for k in redis.scan_iter(match=prefix + "*", count=500)]
    values = await redis.mget(keys) if keys else []
    for key, value in zip(keys, values):
        if not value:  # expired between SCAN and MGET
            continue
        name = key.decode()[len(prefix):]
        held = len(value.split(b","))
        h = out.get(name)
        out[name] = Health(name, h.running, True, held) if h else Health(name, 0, alive=False, holding=held)
    return out


async def live_workers(redis: aioredis.Redis, queue: str = "gpu") -> dict[str, Health]:
    """Workers whose health key exists now, by name."""
    prefix = constants.health_key(queue, "")
    keys = [k async for k in redis.scan_iter(match=prefix + "*", count=500)]
    if not keys:
        return {}
    values = await redis.mget(keys)
    out: dict[str, Health] = {}
    for key, value in zip(keys, values):
        if value is None:  # expired between SCAN and MGET
            continue
        name = key.decode()[len(prefix):]
        m = _ONGOING.search(value)
        out[name] = Health(name, int(m.group(1)) if m else 0)
    return out
