"""The sweeper's view of arq (``ArqStages``, a ``workers.sweeper.StageQueue``) and its loop.

The sweeper (``workers.sweeper``) decides, without arq, which job has nothing queued or running
and what to do about it; this module answers its questions from arq's keys and re-drives a
stage by clearing what arq keeps of its id and enqueueing it again. Every CPU worker runs
``sweep_forever`` beside its polling loop.
"""

from __future__ import annotations

import asyncio

from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import deserialize_result
from redis import exceptions as redis_errors

from app import constants
from app.config import Settings
from app.jobs import JobStore
from app.redis_outage import redis_location, retrying
from app.storage import open_storage
from workers import sweeper
from workers.runtime.enqueue import enqueue, enqueue_webhook, redis_settings


class ArqStages:
    """The sweeper's view of arq (``workers.sweeper.StageQueue``): which stage jobs are queued
    or running, what arq recorded when it dropped one, and enqueueing one again."""

    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    async def pending(self, arq_ids: list[str]) -> bool:
        async def attempt() -> bool:
            async with self.redis.pipeline(transaction=False) as pipe:
                for arq_id in arq_ids:
                    pipe.exists(in_progress_key_prefix + arq_id)
                    for queue in constants.QUEUES.values():
                        pipe.zscore(queue, arq_id)
                replies = await pipe.execute()
            return any(r for r in replies)  # EXISTS 1, or a score: queued (perhaps deferred)

        return await retrying(attempt, where=redis_location(self.settings.redis_url))

    async def failure(self, arq_id: str) -> str | None:
        raw = await retrying(lambda: self.redis.get(result_key_prefix + arq_id), where=redis_location(self.settings.redis_url))
        if raw is None:
            return None
        try:
            result = deserialize_result(raw)
        except Exception:  # noqa: BLE001 - an unreadable result is no failure we can name
            return None
        return None if result.success else f"{type(result.result).__name__}: {result.result}"

    async def redrive(self, step: sweeper.Step) -> None:
        async def forget() -> None:
            # Nothing of these ids is queued or running (the sweeper checked): what arq still
            # keeps of them (a result, a try count, a job key left by a lost queue entry) would
            # make it refuse the enqueue or drop the job at once.
            prefixes = (result_key_prefix, retry_key_prefix, job_key_prefix)
            names = [p + i for i in (step.arq_id, *step.clear) for p in prefixes]
            await self.redis.delete(*names)

        await retrying(forget, where=redis_location(self.settings.redis_url))
        await enqueue(self.redis, self.settings, step.function, *step.args, queue=step.queue, arq_id=step.arq_id)

    async def notify(self, job_id: str) -> None:
        await enqueue_webhook(self.redis, job_id, settings=self.settings)


async def sweep_forever(settings: Settings) -> None:
    """The CPU worker's sweeper (``workers.sweeper``), on its own Redis connection."""
    while True:
        try:
            redis = await create_pool(redis_settings(settings, conn_retries=0), default_queue_name=constants.QUEUE_CPU)
            break
        except (redis_errors.RedisError, OSError, asyncio.TimeoutError):
            await asyncio.sleep(5.0)  # the worker itself says Redis is away; try again later
    store = JobStore(redis, result_ttl=settings.result_ttl, where=redis_location(settings.redis_url))
    try:
        await sweeper.Sweeper(store, open_storage(settings.storage_url), ArqStages(redis, settings), settings).run_forever()
    finally:
        await redis.aclose()
