"""The distributed runner: the DAG's stages as arq jobs on Redis, on two queues.

This is the only module that imports arq. Each task decodes its message, checks the job's
state, calls the *same* ``workers.stages`` function the local runner calls, stores what the
next stage needs, updates the job record and enqueues the next stage::

    vtp:cpu   extract -> segment ─┐                 ┌─> merge -> render -> notify
    vtp:gpu                       └─> transcribe ×N ┘

**Fan-out / fan-in.** ``segment`` stores the segmentation, sets a counter of batches left
(SET NX, so a retried segment keeps it) and enqueues one ``transcribe`` per batch. Each
``transcribe`` records its result with one Lua script (``JobStore.record_batch``): the batch
index goes into a set of finished batches, and only if it was not there already is the result
stored and the counter decremented. Whoever then reads 0 batches left enqueues ``merge``
under the deterministic arq id ``<job>:merge``, which arq refuses to enqueue twice, so merge
runs once however often a batch is retried or duplicated. Every stage's arq id is
deterministic the same way (``<job>:<stage>[:<batch>]``).

**State first.** Every task reads the job record before doing anything: a job that ended
(done, failed, cancelled: that is how cancel works) or that is already past this stage (a
stale duplicate) makes the task return at once.

**Retries.** A permanent error (``err.permanent``: bad media, bad options) fails the job at
once with its one-line reason. Anything else is retried by raising arq's ``Retry`` with
exponential backoff (``VTP_RETRY_DELAY``, doubling, capped at 60 s) until ``VTP_JOB_TRIES``
tries; the last failure fails the job. arq's own ``max_tries`` is one more than ours, so that a
try that arq starts after its worker was killed (arq counts that try too) still reaches this
code and fails the job cleanly instead of arq dropping it and leaving the record stuck.

**Timeouts and dead workers.** arq marks a running job with ``arq:in-progress:<id>``; if the
worker dies, the job stays in the queue and another worker reruns it when that key expires.
arq sets its TTL once, to the largest function timeout + 10 s (an hour and more with long CPU
stages). Here it is a short lease (``VTP_LEASE``, 60 s) that the worker renews for the stages
it runs (``_Worker``): a dead worker's stage reruns within a lease, whatever its length,
while a long, healthy stage keeps its own. Each stage runs under its own deadline
(``VTP_TRANSCRIBE_TIMEOUT`` / ``VTP_CPU_TIMEOUT``) that leaves out time spent waiting for
Redis (``_within``); arq's function timeout is a backstop well past it (``BACKSTOP_S``), so a
slow stage is reported and retried here rather than failed by arq without a word. A SIGTERM
(a deploy) drains the worker: the stages in flight finish, and a second signal stops at once
and hands back the tries they were charged (``workers.lifecycle``). Whatever still
leaves a job with no stage queued or running (a submit that died before its enqueue, a
stage arq dropped) is found by the sweeper (``workers.sweeper``, run by every CPU worker,
seen through ``ArqStages``), which re-drives the stage or fails the job.

**Redis outages.** Every Redis operation of a stage waits through an outage of up to a minute
(``app.jobs.retrying``), and the worker's polling loop pauses instead of dying (``_Worker``),
so a Redis restart fails nothing: the stages in flight finish once Redis is back. (A Redis
that persists with ``appendonly yes`` has lost nothing meanwhile.) Should arq's loop end
anyway, ``run_worker`` builds a new worker and connects again as soon as Redis answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from arq import Retry
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import deserialize_result
from arq.worker import Worker, func
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool

from app import constants, costs, errors, keys
from app.config import Settings
from app.jobs import (
    ORDER,
    OUTAGE_CLOCK,
    OUTAGE_S,
    UNREACHABLE,
    JobStore,
    OutageClock,
    connect as connect_plain,
    redis_location,
    redis_retry,
    retrying,
)
from app.messages import (
    ExtractedAudio,
    ExtractRequest,
    JobRecord,
    LanguageRequest,
    MergeRequest,
    Rendered,
    RenderRequest,
    Segmentation,
    SegmentRequest,
    Stage,
    TranscribeRequest,
    decode,
    encode,
)
from app.storage import open_storage
from workers import sweeper
from workers.lifecycle import IdleExit, Lifecycle  # light: no speech stack

if TYPE_CHECKING:
    from workers import stages
    from workers.engines.pool import EnginePool
    from workers.gpu_worker import GpuEngines


def _speech():
    """The stages and the speech stack, imported by workers only: the web process imports this
    module to enqueue (``enqueue_first_stage``, ``enqueue_webhook``) and must stay light."""
    from workers import stages

    return stages


def _engine_pool() -> EnginePool:
    from workers.engines.pool import EnginePool

    return EnginePool()


def _engines(queue: str, settings: Settings) -> EnginePool | GpuEngines:
    """A CPU worker's pool, or the GPU worker's engines (its own hardware, models loaded at start)."""
    if queue == "gpu":
        from workers.gpu_worker import GpuEngines

        return GpuEngines(settings)
    return _engine_pool()

log = logging.getLogger("vtp.worker")

QueueName = Literal["cpu", "gpu"]

#: How often a worker refreshes its health key; the key lives one second longer.
HEALTH_INTERVAL_S = 5
#: arq keeps each finished stage's result this long: while it exists, enqueueing the same
#: deterministic id again is a no-op (the job record's state guards the stages beyond that).
KEEP_RESULT_S = 3600
#: arq's function timeout is the stage's own deadline plus this: a backstop only, for code that
#: ignores cancellation. The stage's deadline fires first, and it leaves out time spent waiting
#: for Redis, as does the failure handling after it (each Redis wait lasts up to OUTAGE_S), so the
#: backstop allows for a few outages. Should it fire anyway, arq records a plain failure and the
#: sweeper re-drives the stage.
BACKSTOP_S = 4 * OUTAGE_S + 30.0
#: Seconds between checks of the queue: the floor of each stage transition's latency.
POLL_DELAY_S = 0.05
#: Seconds between progress events of a long stage (extract, segment): the bar moves, Redis is not flooded.
PROGRESS_INTERVAL_S = 1.0


# -- connecting and enqueueing ------------------------------------------------------------


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


async def _enqueue(
    redis: ArqRedis, settings: Settings, function: str, *args: Any, queue: str, arq_id: str,
    defer: float | None = None, outage_s: float | None = None,
) -> None:
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
    await _enqueue(
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
    await _enqueue(
        redis, settings, constants.FN_WEBHOOK, job_id,
        queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(job_id, "webhook"), outage_s=outage_s,
    )


# -- the task wrapper -----------------------------------------------------------------------


Body = Callable[[JobRecord], Awaitable[str]]


async def _run_stage(ctx: dict, job_id: str, label: str, state: Stage, body: Body, *, enter: bool = True) -> str:
    """Run one stage of one job: check state, enter ``state``, run ``body`` under its deadline,
    and turn failures into a failed job or an arq retry."""
    try:
        outcome = await _checked_run(ctx, job_id, label, state, body, enter=enter)
        await _webhook_if_ended(ctx, job_id)
        return outcome
    except errors.QueueError as exc:
        # Redis itself failed beyond the client's retries, so nothing can be recorded now.
        # Let arq run this stage again later (if Redis is still away, arq cannot even record
        # that, and the job reruns when its in-progress key expires).
        delay = min(ctx["settings"].retry_delay * 2 ** (ctx["job_try"] - 1), 60.0)
        log.warning("%s of job %s: %s; retrying in %.1f s", label, job_id, exc, delay)
        raise Retry(defer=delay) from exc


async def _webhook_if_ended(ctx: dict, job_id: str) -> None:
    """Every way a job ends (done, failed, cancelled meanwhile) passes through a stage that
    returns: queue its webhook there (once: the arq id is deterministic, and the task itself
    skips a webhook already delivered or given up)."""
    record = await ctx["store"].find(job_id)
    if record is not None and record.terminal and record.webhook_url and record.webhook is None:
        await enqueue_webhook(ctx["redis"], job_id, settings=ctx["settings"])


async def _checked_run(ctx: dict, job_id: str, label: str, state: Stage, body: Body, *, enter: bool) -> str:
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
    timeout = settings.transcribe_timeout if label == "transcribe" else settings.cpu_timeout
    try:
        if enter:
            entered = await store.transition(job_id, state)
            record = entered or record
        return await _within(timeout, _metered(ctx, job_id, label, _delayed(settings.stage_delay(label), body, record)))
    except Exception as exc:  # noqa: BLE001 - every failure is classified below
        if isinstance(exc, TimeoutError):
            exc = errors.EngineError(f"{label} took longer than {timeout:g} s")
        return await _handle_failure(ctx, job_id, label, exc)


async def _metered(ctx: dict, job_id: str, label: str, work: Awaitable[str]) -> str:
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


async def _within(timeout: float, work: Awaitable[str]) -> str:
    """``work`` under a deadline that fires on time even when the work sits in a thread, and
    that does not count the time its Redis operations spent waiting for Redis.

    A plain ``asyncio.timeout`` cannot interrupt the engine's native code: the cancellation
    waits for the thread, arq's own (backstop) timeout fires meanwhile, and arq records a plain
    failure behind our back, leaving the job stuck. Here the overrunning work is abandoned
    instead (cancelled: it stops at its next await, once its thread returns, so it hands
    nothing on) and TimeoutError is raised at once, to be retried like any transient error.
    Time the work spent waiting out a Redis outage (``app.jobs.OutageClock``) extends the
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
    delay = min(settings.retry_delay * 2 ** (tries - 1), 60.0)
    log.warning("%s of job %s failed (try %d of %d), retrying in %.1f s: %s", label, job_id, tries, settings.job_tries, delay, reason)
    raise Retry(defer=delay)


def _stage_ctx(ctx: dict) -> stages.StageContext:
    return ctx["stage_ctx"]


def _progress_events(ctx: dict, job_id: str, state: Stage) -> stages.Progress:
    """A stage's progress as job events, at most one per ``PROGRESS_INTERVAL_S`` (and the last
    one, when all is done); a job that ended meanwhile (cancelled) stops the stage."""
    store: JobStore = ctx["store"]
    last = -PROGRESS_INTERVAL_S

    async def progress(done: float, total: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_INTERVAL_S and not (total and done >= total):
            return
        last = now
        if not await store.stage_progress(job_id, state, audio_done=done, audio_total=total):
            raise errors.JobCancelled(f"job {job_id} ended while {state}")

    return progress


# -- the tasks: one per stage -----------------------------------------------------------------


async def extract_task(ctx: dict, data: bytes) -> str:
    req = decode(data, ExtractRequest)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        extracted = await _speech().extract_audio(
            _stage_ctx(ctx), req, progress=_progress_events(ctx, req.job_id, "extracting")
        )
        await store.put_part(req.job_id, "audio", extracted)
        await store.note(req.job_id, duration=extracted.duration)
        await store.count_run(req.job_id, "extract")
        nxt = SegmentRequest(job_id=req.job_id, audio=extracted, options=record.options)
        await _enqueue(
            ctx["redis"], ctx["settings"], constants.FN_SEGMENT, encode(nxt),
            queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(req.job_id, "segment"),
        )
        return f"{extracted.duration:.1f} s of audio"

    return await _run_stage(ctx, req.job_id, "extract", "extracting", body)


async def segment_task(ctx: dict, data: bytes) -> str:
    req = decode(data, SegmentRequest)
    store: JobStore = ctx["store"]
    job_id = req.job_id

    async def body(record: JobRecord) -> str:
        seg = await _speech().segment(_stage_ctx(ctx), req, progress=_progress_events(ctx, job_id, "segmenting"))
        await store.put_part(job_id, "segmentation", seg)
        await store.start_fan_out(job_id, len(seg.batches))
        await store.note(job_id, chunks_total=len(seg.chunks), audio_total=seg.speech_seconds)
        await store.count_run(job_id, "segment")
        if not seg.batches:  # no speech: nothing to transcribe, straight to an empty transcript
            await _enqueue_merge(ctx, job_id)
            return "no speech"
        for batch in seg.batches:
            nxt = TranscribeRequest(job_id=job_id, batch=batch, options=req.options)
            await _enqueue(
                ctx["redis"], ctx["settings"], constants.FN_TRANSCRIBE, encode(nxt),
                queue=constants.QUEUE_GPU, arq_id=constants.arq_job_id(job_id, "transcribe", batch.index),
            )
        # Only now, with every batch queued: a segment rerun after a crash mid-fan-out still
        # sees "segmenting" and queues the rest. (The batches may already have finished and
        # moved the job on to merging: then there is nothing to do.)
        await store.transition(job_id, "transcribing", expect="segmenting")
        return f"{len(seg.chunks)} chunks in {len(seg.batches)} batches"

    return await _run_stage(ctx, job_id, "segment", "segmenting", body)


async def transcribe_task(ctx: dict, data: bytes) -> str:
    req = decode(data, TranscribeRequest)
    store: JobStore = ctx["store"]
    job_id = req.job_id

    async def body(record: JobRecord) -> str:
        part = await _speech().transcribe(_stage_ctx(ctx), await _in_job_language(ctx, req, record))
        await store.count_run(job_id, "transcribe")
        fan = await store.record_batch(job_id, part, len(req.batch.chunks))
        await store.progress(job_id, chunks_done=fan.chunks_done, audio_done=fan.audio_done)
        if fan.batches_left == 0:
            await _enqueue_merge(ctx, job_id)
        return f"batch {req.batch.index}: {len(part.segments)} segments, {fan.batches_left} batches left"

    # No state change here: segment moves the job to "transcribing" once every batch is queued.
    return await _run_stage(ctx, job_id, "transcribe", "transcribing", body, enter=False)


async def _in_job_language(ctx: dict, req: TranscribeRequest, record: JobRecord) -> TranscribeRequest:
    """``req`` with the job's language when it names none: the one recorded on the job, else
    detected from the job's first chunks (its first speech) and recorded, first detection wins
    (``JobStore.settle_language``): every batch of the job decodes in one language, before any
    of its chunks meets another job's in a shared model call."""
    from workers import languages

    if not languages.needs_job_language(req.options):
        return req
    language = record.language
    if not language:
        store: JobStore = ctx["store"]
        seg = await store.get_part(req.job_id, "segmentation", Segmentation)
        first = LanguageRequest(job_id=req.job_id, batches=seg.batches, options=req.options)
        language = await store.settle_language(req.job_id, await _speech().detect_language(_stage_ctx(ctx), first))
    return msgspec.structs.replace(req, options=msgspec.structs.replace(req.options, language=language))


async def _enqueue_merge(ctx: dict, job_id: str) -> None:
    await _enqueue(
        ctx["redis"], ctx["settings"], constants.FN_MERGE, job_id,
        queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(job_id, "merge"),
    )


async def merge_task(ctx: dict, job_id: str) -> str:
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        started = time.perf_counter()
        audio = await store.get_part(job_id, "audio", ExtractedAudio)
        seg = await store.get_part(job_id, "segmentation", Segmentation)
        parts = await store.batch_parts(job_id)
        req = MergeRequest(job_id=job_id, audio=audio, segmentation=seg, parts=parts, options=record.options)
        transcript = await _speech().merge(_stage_ctx(ctx), req)
        timings = {**record.timings, "merge": round(time.perf_counter() - started, 3)}
        from workers.local_runner import with_timings

        transcript = with_timings(transcript, timings, time.time() - record.created_at)
        await store.put_part(job_id, "transcript", transcript)  # what the sweeper re-drives render from
        await store.note(job_id, unheard_seconds=transcript.stats.coverage.unheard_seconds)
        await store.count_run(job_id, "merge")
        nxt = RenderRequest(job_id=job_id, transcript=transcript, formats=record.options.formats, basename=record.basename)
        await _enqueue(
            ctx["redis"], ctx["settings"], constants.FN_RENDER, encode(nxt),
            queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(job_id, "render"),
        )
        return f"{len(transcript.segments)} segments from {len(parts)} batches"

    return await _run_stage(ctx, job_id, "merge", "merging", body)


async def render_task(ctx: dict, data: bytes) -> str:
    req = decode(data, RenderRequest)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        rendered = await _speech().render(_stage_ctx(ctx), req)
        await store.count_run(req.job_id, "render")
        await _enqueue(
            ctx["redis"], ctx["settings"], constants.FN_NOTIFY, req.job_id, encode(rendered),
            queue=constants.QUEUE_CPU, arq_id=constants.arq_job_id(req.job_id, "notify"),
        )
        return ", ".join(rendered.outputs)

    return await _run_stage(ctx, req.job_id, "render", "rendering", body)


async def notify_task(ctx: dict, job_id: str, data: bytes) -> str:
    """The last stage: the job becomes ``done`` with its outputs, and its final event goes out."""
    rendered = decode(data, Rendered)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        await store.count_run(job_id, "notify")
        done = await store.transition(job_id, "done", expect="rendering", outputs=rendered.outputs)
        if done is None:
            return "already done"
        await store.remember_done(done)
        try:  # the batches' audio is only needed while transcribing
            await _stage_ctx(ctx).storage.delete_prefix(f"{keys.job_prefix(job_id)}/batches")
        except errors.VtpError as exc:
            log.warning("job %s: could not delete its batch audio: %s", job_id, exc)
        return f"done in {done.wall_seconds:.1f} s"

    return await _run_stage(ctx, job_id, "notify", "done", body, enter=False)


async def webhook_task(ctx: dict, job_id: str) -> str:
    """One delivery attempt of a finished job's webhook (``app.webhooks``); arq runs it again
    after the backoff until it is delivered or given up."""
    from app import webhooks

    try:
        wait = await webhooks.deliver(ctx["store"], ctx["settings"], ctx["guard"], job_id)
    except errors.QueueError as exc:
        log.warning("webhook of job %s: %s; retrying", job_id, exc)
        raise Retry(defer=ctx["settings"].webhook_retry_delay) from exc
    if wait is None:
        return "webhook settled"
    raise Retry(defer=wait)


# -- worker settings: one per queue -----------------------------------------------------------


def default_name() -> str:
    return socket.gethostname()


def worker_settings(
    queue: QueueName, settings: Settings, *, concurrency: int | None = None, name: str | None = None,
    engines: EnginePool | GpuEngines | None = None,
) -> dict[str, Any]:
    """arq ``Worker`` keyword arguments for the ``cpu`` or the ``gpu`` queue."""
    cpu_timeout = settings.cpu_timeout + BACKSTOP_S
    if queue == "cpu":
        functions = [
            func(extract_task, name=constants.FN_EXTRACT, timeout=cpu_timeout),
            func(segment_task, name=constants.FN_SEGMENT, timeout=cpu_timeout),
            func(merge_task, name=constants.FN_MERGE, timeout=cpu_timeout),
            func(render_task, name=constants.FN_RENDER, timeout=cpu_timeout),
            func(notify_task, name=constants.FN_NOTIFY, timeout=cpu_timeout),
            # Its own tries are counted in the job record; arq's bound is a backstop only.
            func(webhook_task, name=constants.FN_WEBHOOK, timeout=60, max_tries=settings.webhook_tries + 2),
        ]
        default_concurrency = os.cpu_count() or 2
    elif queue == "gpu":
        # transcribe alone: GPU hosts hold the model and nothing else (the lease, not the timeout, bounds reruns)
        functions = [func(transcribe_task, name=constants.FN_TRANSCRIBE, timeout=settings.transcribe_timeout + BACKSTOP_S)]
        # Several jobs at once, one model: their chunks share decode batches (workers/batcher.py).
        # On CPU one job's batch already keeps every core busy: more at once would only stretch
        # each job's time towards its deadline, so "auto" (0) is 4 on a GPU and 1 on CPU.
        engines = engines or _engines(queue, settings)
        default_concurrency = settings.gpu_jobs or (4 if getattr(engines, "hardware", None) and engines.hardware.device == "cuda" else 1)
    else:
        raise errors.OptionsError(f"unknown queue {queue!r}: use cpu or gpu")
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
        "ctx": {"settings": settings, "engines": engines or _engines(queue, settings)},
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
    from app.netguard import Guard

    ctx["guard"] = Guard(settings.private_allowlist)
    ctx["stage_ctx"] = _speech().StageContext(
        storage=open_storage(settings.storage_url), settings=settings, engines=ctx["engines"]
    )


class _Worker(Worker):
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
    Redis calls wait for Redis through ``app.jobs.retrying``), so a Redis restart costs no rerun.

    **Shutdown.** SIGINT/SIGTERM drains (``workers.lifecycle``): no new jobs, the running ones
    finish; a second signal stops at once and hands back the tries of the jobs it cut short.
    """

    _outage_since: float | None = None
    #: Idle exit and SIGTERM drain (``workers/lifecycle.py``); None: arq's own behaviour.
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
        await _enqueue(self.redis, self.settings, step.function, *step.args, queue=step.queue, arq_id=step.arq_id)

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


async def run_worker(
    queue: QueueName, settings: Settings, *, concurrency: int | None = None, name: str | None = None, burst: bool = False,
    idle_exit: float | None = None,
) -> None:
    """Run a worker until SIGINT/SIGTERM (or, with ``burst``, until its queue is empty; with
    ``idle_exit`` seconds, default ``VTP_IDLE_EXIT``, once its queue has been idle that long).
    A signal drains: the running jobs finish, no new one starts (``workers/lifecycle.py``).

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
    engines = _engines(queue, settings)
    where = redis_location(settings.redis_url)
    lifecycle = Lifecycle(
        idle_exit=settings.idle_exit if idle_exit is None else idle_exit,
        in_progress_prefix=in_progress_key_prefix,
        retry_prefix=retry_key_prefix,
    )
    pause = 1.0
    while True:
        kwargs = worker_settings(queue, settings, concurrency=concurrency, name=name, engines=engines)
        worker = _Worker(**kwargs, burst=burst, lease=settings.lease)
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
                pause = 1.0  # it had been up a while: this is a new outage
            log.warning("lost Redis at %s (%s: %s); reconnecting in %.0f s", where, type(exc).__name__, exc, pause)
            await _abandon(worker)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)


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
