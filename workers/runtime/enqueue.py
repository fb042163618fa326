"""Connecting to Redis and enqueueing stages: the light client the web process and the CLI import.

No stage, no engine, no speech stack is imported here (pinned by the web and controller import
tests). Every stage has a deterministic arq id (``app.constants.arq_job_id``): enqueueing an id
that is already queued, running or finished is a no-op, which is what makes fan-in and the
sweeper's re-drive safe. Every enqueue waits out a Redis outage (``app.redis_outage.retrying``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool

from app import constants, errors
from app.config import Settings
from app.redis_outage import redis_location, redis_retry, retrying
from app.messages import ExtractRequest, JobRecord, encode


def redis_settings(settings: Settings, *, conn_retries: int = 5) -> RedisSettings:
    try:
        base = RedisSettings.from_dsn(settings.redis_url)
    except (RuntimeError, ValueError) as exc:
        raise errors.OptionsError(f"REDIS_URL {settings.redis_url!r} is not a redis:// URL: {exc}") from None
    return dataclasses.replace(
        base,
        conn_retries=conn_retries,
        conn_timeout=2,
        retry=redis_retry(),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )


async def connect(settings: Settings, *, conn_retries: int = 0) -> ArqRedis:
    """An arq-capable Redis client (it can enqueue); ``QueueError`` at once if Redis cannot be
    reached (a CLI says so in a second rather than after a minute of retries)."""
    rs = redis_settings(settings, conn_retries=conn_retries)
    try:
        return await create_pool(rs, default_queue_name=constants.QUEUE_CPU)
    except (redis_errors.RedisError, OSError, asyncio.TimeoutError) as exc:
        raise errors.QueueError(f"cannot reach Redis at {redis_location(settings.redis_url)}: {exc}") from exc


def client(
    settings: Settings, *, socket_timeout: float = 10.0, max_connections: int | None = None, pool_wait_s: float = 2.0
) -> ArqRedis:
    """An arq-capable Redis client that connects on first use (the web process starts, and
    answers 503, while Redis is away; ``connect`` instead fails at once). With
    ``max_connections`` it holds at most that many connections: a command waits up to
    ``pool_wait_s`` for a free one, then fails as Redis being unreachable would."""
    kwargs: dict[str, Any] = dict(
        socket_connect_timeout=1, socket_timeout=socket_timeout,
        retry=redis_retry(1), retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )
    if max_connections is None:
        return ArqRedis.from_url(settings.redis_url, **kwargs)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=pool_wait_s, **kwargs
    )
    return ArqRedis(pool_or_conn=pool)


async def enqueue(
    redis: ArqRedis, settings: Settings, function: str, *args: Any, queue: str, arq_id: str,
    defer: float | None = None, outage_s: float | None = None,
) -> None:
    """Queue ``function(*args)`` on ``queue`` under ``arq_id`` (a no-op if that id is already
    queued, running or finished), waiting out a Redis outage of up to ``outage_s``."""

    async def attempt() -> None:
        job = await redis.enqueue_job(
            function, *args, _job_id=arq_id, _queue_name=queue, _expires=max(settings.result_ttl, 86400),
            _defer_by=defer,
        )
        # None is normal: the same deterministic id is already queued, running or finished.
        # But arq also returns None when its WATCH broke on a lost connection: check.
        if job is None and not await redis.exists(job_key_prefix + arq_id, result_key_prefix + arq_id):
            raise redis_errors.ConnectionError(f"enqueueing {arq_id} was interrupted")

    if outage_s is None:
        await retrying(attempt, where=redis_location(settings.redis_url))
    else:
        await retrying(attempt, where=redis_location(settings.redis_url), outage_s=outage_s)


async def enqueue_first_stage(
    redis: ArqRedis, record: JobRecord, *, settings: Settings, outage_s: float | None = None
) -> None:
    """What ``submit`` calls once the job record exists: queue its extraction."""
    req = ExtractRequest(job_id=record.id, media_key=record.media_key, source_name=record.input_name)
    await enqueue(
        redis,
        settings,
        constants.FN_EXTRACT,
        encode(req),
        queue=constants.QUEUE_CPU,
        arq_id=constants.arq_job_id(record.id, "extract"),
        outage_s=outage_s,
    )


async def enqueue_webhook(redis: ArqRedis, job_id: str, *, settings: Settings, outage_s: float | None = None) -> None:
    """Queue the webhook of a job that has ended (a no-op while one is queued or running)."""
    await enqueue(
        redis, settings, constants.FN_WEBHOOK, job_id,
        queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(job_id, "webhook"), outage_s=outage_s,
    )
