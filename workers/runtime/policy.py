"""The policy around every stage: state check, deadline, metering, then retry or fail.

``run_stage`` is what each task in ``workers.runtime.tasks`` runs its body under:

- **State first**: a job with no record, or one that ended or is already past this stage,
  makes the task return at once (a stale duplicate, or a cancel).
- **Deadline**: ``VTP_TRANSCRIBE_TIMEOUT`` / ``VTP_CPU_TIMEOUT``, not counting time spent waiting
  out a Redis outage (``within``); arq's own function timeout (``BACKSTOP_S`` later) is a backstop.
- **Metering**: the stage's machine time and cost are added to the job, success or not.
- **Retry**: a permanent error fails the job with its reason; any other is retried by raising
  arq's ``Retry`` with exponential backoff until ``VTP_JOB_TRIES``; the last failure fails the job.
  A job that ends here has its webhook queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from arq import Retry

from app import backoff, errors
from app.config import Settings
from app.dag import ORDER, StageDef
from app.jobs import JobStore
from app.redis_outage import OUTAGE_CLOCK, OUTAGE_S, OutageClock
from app.messages import JobRecord
from workers.runtime.enqueue import enqueue_webhook

log = logging.getLogger("vtp.worker")

#: arq's function timeout is the stage's own deadline plus this: a backstop only, for code that
#: ignores cancellation. The stage's deadline fires first, and it leaves out time spent waiting
#: for Redis, as does the failure handling after it (each Redis wait lasts up to OUTAGE_S), so the
#: backstop allows for a few outages. Should it fire anyway, arq records a plain failure and the
#: sweeper re-drives the stage.
BACKSTOP_S = 4 * OUTAGE_S + 30.0

#: Longest wait before a stage's retry (``VTP_RETRY_DELAY`` doubles up to this).
MAX_RETRY_DELAY_S = 60.0

Body = Callable[[JobRecord], Awaitable[str]]


async def run_stage(ctx: dict, job_id: str, stage: StageDef, body: Body) -> str:
    """Run one stage of one job: check state, enter the stage's state (``stage.enters``), run
    ``body`` under the stage's deadline (``stage.deadline``),
    and turn failures into a failed job or an arq retry."""
    try:
        outcome = await _checked_run(ctx, job_id, stage, body)
        await _webhook_if_ended(ctx, job_id)
        return outcome
    except errors.QueueError as exc:
        # Redis itself failed beyond the client's retries, so nothing can be recorded now.
        # Let arq run this stage again later (if Redis is still away, arq cannot even record
        # that, and the job reruns when its in-progress key expires).
        delay = backoff.exponential(ctx["job_try"], ctx["settings"].retry_delay, MAX_RETRY_DELAY_S)
        log.warning("%s of job %s: %s; retrying in %.1f s", stage.name, job_id, exc, delay)
        raise Retry(defer=delay) from exc


async def _webhook_if_ended(ctx: dict, job_id: str) -> None:
    """Every way a job ends (done, failed, cancelled meanwhile) passes through a stage that
    returns: queue its webhook there (once: the arq id is deterministic, and the task itself
    skips a webhook already delivered or given up)."""
    record = await ctx["store"].find(job_id)
    if record is not None and record.terminal and record.webhook_url and record.webhook is None:
        await enqueue_webhook(ctx["redis"], job_id, settings=ctx["settings"])


async def _checked_run(ctx: dict, job_id: str, stage: StageDef, body: Body) -> str:
    label, state = stage.name, stage.state
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    tries: int = ctx["job_try"]
    record = await store.find(job_id)
    if record is None:
        log.warning("%s: job %s has no record (expired?); dropping", label, job_id)
        return "no such job"
    if record.terminal:
        return f"skipped: job is {record.state}"
    if ORDER[record.state] > ORDER[state]:
        return f"skipped: job is already {record.state}"
    if tries > settings.job_tries:  # the previous try's worker died (or arq's backstop fired)
        reason = f"{label} gave up after {settings.job_tries} tries (worker lost or timed out)"
        await store.fail(job_id, reason)
        return reason
    if tries == 1:
        await store.note_wait(job_id, label, max(time.time() - ctx["enqueue_time"].timestamp(), 0.0))
    timeout = stage.timeout(settings)
    try:
        if stage.enters:
            entered = await store.transition(job_id, state)
            record = entered or record
        return await within(timeout, metered(ctx, job_id, label, _delayed(settings.stage_delay(label), body, record)))
    except Exception as exc:  # noqa: BLE001 - every failure is classified below
        if isinstance(exc, TimeoutError):
            exc = errors.EngineError(f"{label} took longer than {timeout:g} s")
        return await _handle_failure(ctx, job_id, label, exc)


async def metered(ctx: dict, job_id: str, label: str, work: Awaitable[str]) -> str:
    """Run a stage's work and add its machine time and cost to the job (app.costs), whether it
    succeeded or not: the machine was busy either way."""
    started = time.monotonic()
    try:
        return await work
    finally:
        seconds = time.monotonic() - started
        try:
            await ctx["store"].add_usage(job_id, label, seconds, seconds * ctx.get("usage_rate", 0.0))
        except errors.VtpError as exc:  # accounting never fails a stage
            log.warning("job %s: could not record %s's machine time: %s", job_id, label, exc)


async def _delayed(delay: float, body: Body, record: JobRecord) -> str:
    if delay:  # TEST-ONLY hook (VTP_TEST_STAGE_DELAY): a window to kill the worker mid-stage
        await asyncio.sleep(delay)
    return await body(record)


async def within(timeout: float, work: Awaitable[str]) -> str:
    """``work`` under a deadline that fires on time even when the work sits in a thread, and
    that does not count the time its Redis operations spent waiting for Redis.

    A plain ``asyncio.timeout`` cannot interrupt the engine's native code: the cancellation
    waits for the thread, arq's own (backstop) timeout fires meanwhile, and arq records a plain
    failure behind our back, leaving the job stuck. Here the overrunning work is abandoned
    instead (cancelled: it stops at its next await, once its thread returns, so it hands
    nothing on) and TimeoutError is raised at once, to be retried like any transient error.
    Time the work spent waiting out a Redis outage (``app.redis_outage.OutageClock``) extends the
    deadline: a stage that sat through a Redis restart is not a slow stage.
    """
    clock = OutageClock()
    token = OUTAGE_CLOCK.set(clock)
    try:
        task = asyncio.ensure_future(work)  # the task copies the context: its waits go to `clock`
    finally:
        OUTAGE_CLOCK.reset(token)
    started = time.monotonic()
    try:
        while True:
            left = timeout - (time.monotonic() - started - clock.waited())
            if left <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()


async def _handle_failure(ctx: dict, job_id: str, label: str, exc: Exception) -> str:
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    tries: int = ctx["job_try"]
    current = await store.find(job_id)
    if current is None or current.terminal:  # cancelled (or failed elsewhere) meanwhile: not an error
        return f"stopped: job is {current.state if current else 'gone'}"
    if isinstance(exc, errors.VtpError):
        reason = str(exc)
    else:
        log.exception("%s of job %s raised an unexpected error", label, job_id)
        reason = f"{label} failed: {type(exc).__name__}: {exc}"
    permanent = isinstance(exc, errors.VtpError) and exc.permanent
    if permanent or tries >= settings.job_tries:
        if not permanent:
            reason = f"{reason} (gave up after {tries} tries)"
        await store.fail(job_id, reason)
        log.warning("job %s failed in %s: %s", job_id, label, reason)
        return f"failed: {reason}"
    delay = backoff.exponential(tries, settings.retry_delay, MAX_RETRY_DELAY_S)
    log.warning("%s of job %s failed (try %d of %d), retrying in %.1f s: %s", label, job_id, tries, settings.job_tries, delay, reason)
    raise Retry(defer=delay)
