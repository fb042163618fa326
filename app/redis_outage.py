"""Riding out a Redis outage: the retry policy of every Redis client, and ``retrying``.

Redis restarts (a deploy, a crash, the load of its append-only file) must fail nothing: every
operation of ``JobStore`` and every enqueue is retried as a whole for up to ``OUTAGE_S``, then
raises ``QueueError("cannot reach Redis at ...")``; any other Redis error is a ``QueueError``
at once. Time spent waiting is added to the task's ``OutageClock`` so that stage deadlines
leave it out.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import wraps
from typing import TypeVar
from urllib.parse import urlparse

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from app import backoff, errors

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
    failures = 0
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
                failures += 1
                await anyio.sleep(backoff.exponential(failures, 0.05, 1.0))
            except redis_errors.RedisError as exc:
                raise errors.QueueError(f"Redis at {where} failed: {exc}") from exc
    finally:
        if clock is not None:
            clock.end()


def redis_op(fn):
    """A store method (its object has ``where`` and ``outage_s``) retried through Redis outages;
    Redis failures become ``QueueError`` naming the server."""

    @wraps(fn)
    async def wrapper(self, *args, **kwargs):
        return await retrying(lambda: fn(self, *args, **kwargs), where=self.where, outage_s=self.outage_s)

    return wrapper
