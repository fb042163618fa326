"""A worker's health key (``vtp:health:<queue>:<name>``, arq's own health check, kept alive
while the worker runs): ``vtp worker --check``, and the GPU worker's models and batcher counters.

Light: no stage and no speech stack, so a health check starts quickly.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Literal

from arq.connections import ArqRedis
from redis import exceptions as redis_errors

from app import constants
from app.config import Settings
from app.redis_outage import connect as connect_plain, redis_location

if TYPE_CHECKING:
    from workers.gpu_worker import GpuEngines

QueueName = Literal["cpu", "gpu"]

#: How often a worker refreshes its health key; the key lives one second longer.
HEALTH_INTERVAL_S = 5


def default_name() -> str:
    return socket.gethostname()


async def check_health(queue: QueueName, settings: Settings, *, name: str | None = None) -> tuple[bool, str]:
    """Is the worker named ``name`` on ``queue`` alive? Its health key exists only while it runs."""
    redis = connect_plain(settings.redis_url, retries=1)
    key = constants.health_key(queue, name or default_name())
    try:
        value = await redis.get(key)
    except (redis_errors.RedisError, OSError) as exc:
        return False, f"cannot reach Redis at {redis_location(settings.redis_url)}: {exc}"
    finally:
        await redis.aclose()
    if value is None:
        return False, f"no live worker: {key} is not set"
    return True, value.decode(errors="replace")


async def publish_gpu_stats(redis: ArqRedis, health_key: str, engines: GpuEngines, *, ttl_s: float) -> None:
    """The loaded models in the health key (APPEND keeps its TTL), and the batcher's counters in
    ``vtp:gpustats:<name>`` (a hash, for the web process's /metrics)."""
    name = health_key.rsplit(":", 1)[-1]
    stats_key = constants.gpu_stats_key(name)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.append(health_key, f" {engines.describe()}".encode())
        pipe.hset(stats_key, mapping={k: str(v) for k, v in engines.stats().items()})
        pipe.expire(stats_key, max(int(ttl_s), 1) * 6)
        await pipe.execute()
