"""When a worker stops: after its queue has been idle for a while, or drained on SIGTERM.

**Idle exit** (``vtp worker --idle-exit SECONDS``, ``VTP_IDLE_EXIT``): a GPU machine that bills
by the second should stop itself once there is nothing to do. The worker exits (code 0) once
nothing has run on it *and* its queue has held no waiting job for that long. A job that sits
in the queue while another worker runs it (its in-progress key exists) is not waiting; a job
deferred for a retry is, so a retry keeps the worker up. The check costs one ZRANGE (plus one
EXISTS per queued job, at most ``_SCAN`` of them) at most once a second.

**Drain** (SIGTERM/SIGINT): the worker stops taking jobs and lets the ones in flight finish
(each is bounded by its stage deadline), then exits 0. arq's own handler cancels them instead,
and arq counts every *start* of a job as a try, so a deploy would use up tries. A second
signal stops at once: the jobs still running are cancelled (arq queues them again), and the try
each of them was charged is handed back, so a deploy never brings a job closer to failing.

Duck-typed against arq's ``Worker`` (``tasks``, ``job_counter``, ``allow_pick_jobs``,
``main_task``, ``pool``, ``queue_name``) so that arq stays imported by the worker's modules alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vtp.worker")

#: At most this many queued job ids are looked at to decide "is anything waiting?".
_SCAN = 100
#: Seconds between two looks at the queue while the worker is idle.
_CHECK_EVERY_S = 1.0


class IdleExit(Exception):
    """Raised out of the worker's poll loop: the queue stayed empty for ``idle_exit`` seconds."""


class Lifecycle:
    def __init__(
        self,
        *,
        idle_exit: float = 0.0,
        in_progress_prefix: str,
        retry_prefix: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_exit = idle_exit
        self.in_progress_prefix = in_progress_prefix
        self.retry_prefix = retry_prefix
        self.clock = clock
        self.busy_at: float | None = None  # set at the first poll: loading models is not idling
        self._checked_at = float("-inf")
        self.draining = False
        self._drain_task: asyncio.Task | None = None
        self.stopped_by: str = ""

    # -- idle exit ---------------------------------------------------------------------------

    async def after_poll(self, worker: Any) -> None:
        """Called after each poll of the queue; raises ``IdleExit`` when it is time to go."""
        now = self.clock()
        if self.busy_at is None or worker.tasks or worker.job_counter:
            self.busy_at = now
            return
        if self.idle_exit <= 0 or self.draining or now - self._checked_at < min(_CHECK_EVERY_S, self.idle_exit / 4):
            return
        self._checked_at = now
        if await self.queue_has_waiting_job(worker.pool, worker.queue_name):
            self.busy_at = now
            return
        if now - self.busy_at >= self.idle_exit:
            worker.allow_pick_jobs = False
            self.stopped_by = "idle"
            log.info("queue %s idle for %.0f s: exiting (--idle-exit %g)", worker.queue_name, now - self.busy_at, self.idle_exit)
            raise IdleExit

    async def queue_has_waiting_job(self, pool: Any, queue_name: str) -> bool:
        ids = await pool.zrange(queue_name, 0, _SCAN - 1)
        if not ids:
            return False
        if len(ids) >= _SCAN:
            return True
        async with pool.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.in_progress_prefix + job_id.decode())
            running = await pipe.execute()
        return not all(running)

    # -- drain on SIGTERM --------------------------------------------------------------------

    def on_signal(self, worker: Any, signum: int) -> None:
        """arq's signal handler, replaced: the first signal drains, a second one stops now."""
        name = signal.Signals(signum).name
        if not self.draining:
            self.draining = True
            self.stopped_by = name
            worker.allow_pick_jobs = False
            running = sum(not t.done() for t in worker.tasks.values())
            log.info("%s: taking no more jobs, finishing the %d running; send it again to stop now", name, running)
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(worker))
            return
        log.warning("%s again: stopping now; the running jobs are queued again without losing a try", name)
        if self._drain_task is not None:
            self._drain_task.cancel()
        asyncio.get_running_loop().create_task(self._stop_now(worker))

    async def _drain(self, worker: Any) -> None:
        while any(not t.done() for t in worker.tasks.values()):
            await asyncio.sleep(0.05)
        log.info("drained: every running job finished; exiting")
        if worker.main_task is not None:
            worker.main_task.cancel()

    async def _stop_now(self, worker: Any) -> None:
        running = [job_id for job_id, t in worker.tasks.items() if not t.done()]
        for job_id in running:
            worker.tasks[job_id].cancel()
        # arq's run_job catches the cancellation and queues the job again; wait for that.
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        if running:
            try:
                async with worker.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.decr(self.retry_prefix + job_id)
                    await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - Redis away: the try stays counted, nothing worse
                log.warning("could not hand back the tries of %d interrupted jobs: %s", len(running), exc)
        if worker.main_task is not None:
            worker.main_task.cancel()
