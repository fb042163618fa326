"""The worker: arq ``Worker`` settings per queue, arq's ``Worker`` with our overrides, the reconnect loop.

**arq's private names.** This is the one module that reaches past arq's public API:
``Worker._poll_iteration`` (a Redis outage pauses polling instead of ending it),
``Worker._last_health_check`` (GPU stats go out with each health record), ``Worker._pool`` (a
worker whose Redis went away is dropped without Redis) and ``in_progress_timeout_s`` (the lease).
Checked against arq 0.28.0 (pyproject allows ``arq>=0.26,<0.29``); a new arq version means
reading ``arq/worker.py`` for these names again. ``workers.runtime.lifecycle`` uses only public
attributes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from arq.constants import in_progress_key_prefix, retry_key_prefix
from arq.worker import Worker, func
from redis import exceptions as redis_errors

from app import backoff, constants, costs, dag, errors
from app.config import Settings
from app.jobs import JobStore
from app.redis_outage import UNREACHABLE, redis_location
from app.netguard import Guard
from app.storage import open_storage
from workers import stages
from workers.engines.pool import EnginePool
from workers.gpu_worker import GpuEngines
from workers.runtime import tasks
from workers.runtime.enqueue import redis_settings
from workers.runtime.health import HEALTH_INTERVAL_S, QueueName, default_name, publish_gpu_stats
from workers.runtime.lifecycle import IdleExit, Lifecycle
from workers.runtime.policy import BACKSTOP_S
from workers.runtime.sweep import sweep_forever

log = logging.getLogger("vtp.worker")

#: arq keeps each finished stage's result this long: while it exists, enqueueing the same
#: deterministic id again is a no-op (the job record's state guards the stages beyond that).
KEEP_RESULT_S = 3600
#: Seconds between checks of the queue: the floor of each stage transition's latency.
POLL_DELAY_S = 0.05


def engines_for(queue: str, settings: Settings) -> EnginePool | GpuEngines:
    """A CPU worker's pool, or the GPU worker's engines (its own hardware, models loaded at start)."""
    return GpuEngines(settings) if queue == "gpu" else EnginePool()


def worker_settings(
    queue: QueueName, settings: Settings, *, concurrency: int | None = None, name: str | None = None,
    engines: EnginePool | GpuEngines | None = None,
) -> dict[str, Any]:
    """arq ``Worker`` keyword arguments for the ``cpu`` or the ``gpu`` queue."""
    if queue not in constants.QUEUES:
        raise errors.OptionsError(f"unknown queue {queue!r}: use cpu or gpu")
    # The stages of this queue, from the DAG table; arq's timeout is a backstop past each deadline.
    functions = [
        func(tasks.TASKS[s.function], name=s.function, timeout=s.timeout(settings) + BACKSTOP_S) for s in dag.ON_QUEUE[queue]
    ]
    if queue == "cpu":
        # Its own tries are counted in the job record; arq's bound is a backstop only.
        functions.append(func(tasks.webhook_task, name=constants.FN_WEBHOOK, timeout=60, max_tries=settings.webhook_tries + 2))
        default_concurrency = os.cpu_count() or 2
    else:
        # GPU hosts hold the model and run transcribe alone (the lease, not the timeout, bounds reruns).
        # Several jobs at once, one model: their chunks share decode batches (workers/batcher.py).
        # On CPU one job's batch already keeps every core busy: more at once would only stretch
        # each job's time towards its deadline, so "auto" (0) is 4 on a GPU and 1 on CPU.
        engines = engines or engines_for(queue, settings)
        default_concurrency = settings.gpu_jobs or (4 if getattr(engines, "hardware", None) and engines.hardware.device == "cuda" else 1)
    kwargs = {
        "functions": functions,
        "queue_name": constants.QUEUES[queue],
        "redis_settings": redis_settings(settings),
        "max_jobs": concurrency or default_concurrency,
        "keep_result": KEEP_RESULT_S,
        "max_tries": settings.job_tries + 1,  # one more than ours: see the module docstring
        "retry_jobs": True,  # Retry and a SIGTERM'd worker's cancelled jobs run again
        "allow_abort_jobs": False,  # cancel is the job record's state, checked by every task
        "health_check_interval": HEALTH_INTERVAL_S,
        "health_check_key": constants.health_key(queue, name or default_name()),
        "poll_delay": POLL_DELAY_S,
        "expires_extra_ms": max(settings.result_ttl, 86400) * 1000,
        "ctx": {"settings": settings, "engines": engines or engines_for(queue, settings)},
        "on_startup": _startup,
        "log_results": True,
    }
    # Each job's share of this machine's $/hour (app.costs): a worker running N at once charges 1/N.
    kwargs["ctx"]["usage_rate"] = costs.rate_per_slot_second(settings, kwargs["max_jobs"])
    return kwargs


async def _startup(ctx: dict) -> None:
    settings: Settings = ctx["settings"]
    if hasattr(ctx["engines"], "load_all"):  # a GPU worker: its models load before it takes a job
        await asyncio.to_thread(ctx["engines"].load_all)
    ctx["store"] = JobStore(ctx["redis"], result_ttl=settings.result_ttl, where=redis_location(settings.redis_url))
    ctx["guard"] = Guard(settings.private_allowlist)
    ctx["stage_ctx"] = stages.StageContext(
        storage=open_storage(settings.storage_url), settings=settings, engines=ctx["engines"]
    )


class VtpWorker(Worker):
    """arq's worker with short, renewed leases, and a Redis outage pauses its polling instead of
    ending it.

    **Leases.** arq marks a started job ``arq:in-progress:<id>`` for the largest function
    timeout + 10 s, once; a dead worker's stage waits that long to be rerun. Here the key lives
    ``VTP_LEASE`` seconds and this worker renews it (``PEXPIRE``, never recreating an expired
    key) every third of that for the jobs it is running, from its polling loop, so a dead worker's
    stage is rerun within a lease while a long, healthy stage keeps its own. The same renewal
    sets ``vtp:beat:<job id>``: the job is being worked on (``vtp submit --wait`` reads it), and
    ``vtp:holds:<queue>:<name>``: what this worker holds (the fleet controller never destroys
    the machine of a worker that holds a lease, whether or not it saw its health key).

    **Outages.** arq's loop raises out of ``main()`` on the first failed Redis call; here a failed
    poll is logged and retried a second later, while the jobs in flight keep running (their own
    Redis calls wait for Redis through ``app.redis_outage.retrying``), so a Redis restart costs no rerun.

    **Shutdown.** SIGINT/SIGTERM drains (``workers.runtime.lifecycle``): no new jobs, the running ones
    finish; a second signal stops at once and hands back the tries of the jobs it cut short.
    """

    _outage_since: float | None = None
    #: Idle exit and SIGTERM drain (``workers.runtime.lifecycle``); None: arq's own behaviour.
    lifecycle: Lifecycle | None = None

    def __init__(self, *args: Any, lease: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = lease
        self.in_progress_timeout_s = lease  # arq's own: the largest function timeout + 10 s
        self._renewed_at = 0.0
        self._renewed: set[str] = set()

    async def heart_beat(self) -> None:
        await super().heart_beat()
        await self.renew_leases()

    async def renew_leases(self) -> None:
        running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        now = time.monotonic()
        holds = constants.HOLDS_PREFIX + self.health_check_key[len(constants.HEALTH_PREFIX):]
        if not running:
            if self._renewed:  # its last stage ended: it holds nothing now
                await self.pool.delete(holds)
                self._renewed = set()
            return
        if now - self._renewed_at < self.lease / 3 and running <= self._renewed:
            return
        ms = int(self.lease * 1000)
        async with self.pool.pipeline(transaction=False) as pipe:
            for arq_id in running:
                pipe.pexpire(in_progress_key_prefix + arq_id, ms)
                pipe.set(constants.beat_key(arq_id.split(":", 1)[0]), f"{time.time():.3f}", px=ms)
            # what this worker holds, for the fleet controller (never destroys its machine)
            pipe.set(holds, ",".join(sorted(running)), px=ms)
            await pipe.execute()
        self._renewed_at, self._renewed = now, running

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            if self.lifecycle is not None:
                await self.lifecycle.after_poll(self)  # may raise IdleExit
        except UNREACHABLE as exc:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("Redis unreachable (%s: %s); polling again every second", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
        else:
            if self._outage_since is not None:
                log.warning("Redis is back after %.1f s", time.monotonic() - self._outage_since)
                self._outage_since = None

    async def record_health(self) -> None:
        before = self._last_health_check
        await super().record_health()
        engines = self.ctx.get("engines")
        if self._last_health_check != before and hasattr(engines, "describe"):  # a GPU worker
            await publish_gpu_stats(self.pool, self.health_check_key, engines, ttl_s=self.health_check_interval + 1)

    def handle_sig(self, signum: int) -> None:
        if self.lifecycle is None:
            super().handle_sig(signum)
        else:  # drain: finish the running jobs, take no more (a second signal stops at once)
            self.lifecycle.on_signal(self, signum)


async def run_worker(
    queue: QueueName, settings: Settings, *, concurrency: int | None = None, name: str | None = None, burst: bool = False,
    idle_exit: float | None = None,
) -> None:
    """Run a worker until SIGINT/SIGTERM (or, with ``burst``, until its queue is empty; with
    ``idle_exit`` seconds, default ``VTP_IDLE_EXIT``, once its queue has been idle that long).
    A signal drains: the running jobs finish, no new one starts (``workers.runtime.lifecycle``).

    If arq's worker ends with a Redis error anyway (Redis unreachable at start-up, past arq's
    ``conn_retries``), a new worker is built (same loaded models) and connects again as soon
    as Redis answers; jobs the old one was running are rerun by arq once their in-progress
    keys expire.
    """
    sweeping = asyncio.ensure_future(sweep_forever(settings)) if queue == "cpu" and not burst else None
    try:
        await _run_worker(queue, settings, concurrency=concurrency, name=name, burst=burst, idle_exit=idle_exit)
    finally:
        if sweeping is not None:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)


async def _run_worker(
    queue: QueueName, settings: Settings, *, concurrency: int | None, name: str | None, burst: bool,
    idle_exit: float | None,
) -> None:
    engines = engines_for(queue, settings)
    where = redis_location(settings.redis_url)
    lifecycle = Lifecycle(
        idle_exit=settings.idle_exit if idle_exit is None else idle_exit,
        in_progress_prefix=in_progress_key_prefix,
        retry_prefix=retry_key_prefix,
    )
    failures = 0
    while True:
        kwargs = worker_settings(queue, settings, concurrency=concurrency, name=name, engines=engines)
        worker = VtpWorker(**kwargs, burst=burst, lease=settings.lease)
        worker.lifecycle = lifecycle
        started = time.monotonic()
        try:
            await worker.async_run()
            await worker.close()
            return
        except (asyncio.CancelledError, IdleExit):  # a drained signal, or idle long enough
            await worker.close()
            return
        except (redis_errors.RedisError, OSError, asyncio.TimeoutError) as exc:
            if time.monotonic() - started > 60:
                failures = 0  # it had been up a while: this is a new outage
            failures += 1
            pause = backoff.exponential(failures, 1.0, 10.0)
            log.warning("lost Redis at %s (%s: %s); reconnecting in %.0f s", where, type(exc).__name__, exc, pause)
            await _abandon(worker)
            await asyncio.sleep(pause)


async def _abandon(worker: Worker) -> None:
    """Drop a worker whose Redis went away: cancel its jobs (arq reruns them) and its pool."""
    for task in list(worker.tasks.values()):
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    if worker._pool is not None:  # noqa: SLF001 - arq has no public "close without Redis"
        try:
            await worker._pool.aclose(close_connection_pool=True)  # noqa: SLF001
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        worker._pool = None  # noqa: SLF001
