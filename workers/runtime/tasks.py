"""The arq tasks, one per stage: decode the request, run the stage, store its output, queue the next.

Each task runs the *same* ``workers.stages`` function the local runner calls, under the policy of
``workers.runtime.policy.run_stage``; which stage follows, on which queue, and how its request is
built come from the DAG table (``app.dag``). Fan-out: ``segment`` queues one ``transcribe`` per batch;
fan-in: the batch that leaves 0 batches queues ``merge`` under its deterministic id, so merge runs
once. Only workers import this module (it imports the stages and so the speech stack).
"""

from __future__ import annotations

import logging
import time

import msgspec
from arq import Retry

from app import constants, dag, errors, keys, webhooks
from app.jobs import JobStore
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
)
from workers import languages, stages
from workers.merge import with_timings
from workers.runtime.enqueue import enqueue
from workers.runtime.policy import run_stage

log = logging.getLogger("vtp.worker")

#: Seconds between progress events of a long stage (extract, segment): the bar moves, Redis is not flooded.
PROGRESS_INTERVAL_S = 1.0


def stage_ctx(ctx: dict) -> stages.StageContext:
    return ctx["stage_ctx"]


def progress_events(ctx: dict, job_id: str, state: Stage) -> stages.Progress:
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


# -- the tasks: one per stage (their order, queues and successors: ``app.dag``) ---------------

EXTRACT, SEGMENT, TRANSCRIBE, MERGE, RENDER, NOTIFY = (
    dag.STAGE[n] for n in ("extract", "segment", "transcribe", "merge", "render", "notify")
)


async def _queue(ctx: dict, stage: dag.StageDef, record: JobRecord, parts: dict | None = None, batch=None) -> None:
    """Enqueue ``stage`` for ``record``, its request built by the DAG table from ``parts``."""
    job = dag.job(stage.name, record, parts, batch)
    await enqueue(ctx["redis"], ctx["settings"], job.function, *job.args, queue=job.queue, arq_id=job.arq_id)


async def extract_task(ctx: dict, data: bytes) -> str:
    req = decode(data, ExtractRequest)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        extracted = await stages.extract_audio(
            stage_ctx(ctx), req, progress=progress_events(ctx, req.job_id, EXTRACT.state)
        )
        await store.put_part(req.job_id, "audio", extracted)
        await store.note(req.job_id, duration=extracted.duration)
        await store.count_run(req.job_id, EXTRACT.name)
        await _queue(ctx, SEGMENT, record, {"audio": extracted})
        return f"{extracted.duration:.1f} s of audio"

    return await run_stage(ctx, req.job_id, EXTRACT, body)


async def segment_task(ctx: dict, data: bytes) -> str:
    req = decode(data, SegmentRequest)
    store: JobStore = ctx["store"]
    job_id = req.job_id

    async def body(record: JobRecord) -> str:
        seg = await stages.segment(stage_ctx(ctx), req, progress=progress_events(ctx, job_id, SEGMENT.state))
        await store.put_part(job_id, "segmentation", seg)
        await store.start_fan_out(job_id, len(seg.batches))
        await store.note(job_id, chunks_total=len(seg.chunks), audio_total=seg.speech_seconds)
        await store.count_run(job_id, SEGMENT.name)
        if not seg.batches:  # no speech: nothing to transcribe, straight to an empty transcript
            await _queue(ctx, MERGE, record)
            return "no speech"
        for batch in seg.batches:
            await _queue(ctx, TRANSCRIBE, record, batch=batch)
        # Only now, with every batch queued: a segment rerun after a crash mid-fan-out still
        # sees "segmenting" and queues the rest. (The batches may already have finished and
        # moved the job on to merging: then there is nothing to do.)
        await store.transition(job_id, TRANSCRIBE.state, expect=SEGMENT.state)
        return f"{len(seg.chunks)} chunks in {len(seg.batches)} batches"

    return await run_stage(ctx, job_id, SEGMENT, body)


async def transcribe_task(ctx: dict, data: bytes) -> str:
    req = decode(data, TranscribeRequest)
    store: JobStore = ctx["store"]
    job_id = req.job_id

    async def body(record: JobRecord) -> str:
        part = await stages.transcribe(stage_ctx(ctx), await _in_job_language(ctx, req, record))
        await store.count_run(job_id, TRANSCRIBE.name)
        fan = await store.record_batch(job_id, part, len(req.batch.chunks))
        await store.progress(job_id, chunks_done=fan.chunks_done, audio_done=fan.audio_done)
        if fan.batches_left == 0:
            await _queue(ctx, MERGE, record)
        return f"batch {req.batch.index}: {len(part.segments)} segments, {fan.batches_left} batches left"

    # No state change here (TRANSCRIBE.enters is False): segment moves the job to "transcribing"
    # once every batch is queued.
    return await run_stage(ctx, job_id, TRANSCRIBE, body)


async def _in_job_language(ctx: dict, req: TranscribeRequest, record: JobRecord) -> TranscribeRequest:
    """``req`` with the job's language when it names none: the one recorded on the job, else
    detected from the job's first chunks (its first speech) and recorded, first detection wins
    (``JobStore.settle_language``): every batch of the job decodes in one language, before any
    of its chunks meets another job's in a shared model call."""
    if not languages.needs_job_language(req.options):
        return req
    language = record.language
    if not language:
        store: JobStore = ctx["store"]
        seg = await store.get_part(req.job_id, "segmentation", Segmentation)
        first = LanguageRequest(job_id=req.job_id, batches=seg.batches, options=req.options)
        language = await store.settle_language(req.job_id, await stages.detect_language(stage_ctx(ctx), first))
    return msgspec.structs.replace(req, options=msgspec.structs.replace(req.options, language=language))


async def merge_task(ctx: dict, job_id: str) -> str:
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        started = time.perf_counter()
        audio = await store.get_part(job_id, "audio", ExtractedAudio)
        seg = await store.get_part(job_id, "segmentation", Segmentation)
        parts = await store.batch_parts(job_id)
        req = MergeRequest(job_id=job_id, audio=audio, segmentation=seg, parts=parts, options=record.options)
        transcript = await stages.merge(stage_ctx(ctx), req)
        timings = {**record.timings, MERGE.name: round(time.perf_counter() - started, 3)}
        transcript = with_timings(transcript, timings, time.time() - record.created_at)
        await store.put_part(job_id, "transcript", transcript)  # what the sweeper re-drives render from
        await store.note(job_id, unheard_seconds=transcript.stats.coverage.unheard_seconds)
        await store.count_run(job_id, MERGE.name)
        await _queue(ctx, RENDER, record, {"transcript": transcript})
        return f"{len(transcript.segments)} segments from {len(parts)} batches"

    return await run_stage(ctx, job_id, MERGE, body)


async def render_task(ctx: dict, data: bytes) -> str:
    req = decode(data, RenderRequest)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        rendered = await stages.render(stage_ctx(ctx), req)
        await store.count_run(req.job_id, RENDER.name)
        await _queue(ctx, NOTIFY, record, {"rendered": rendered})
        return ", ".join(rendered.outputs)

    return await run_stage(ctx, req.job_id, RENDER, body)


async def notify_task(ctx: dict, job_id: str, data: bytes) -> str:
    """The last stage: the job becomes ``done`` with its outputs, and its final event goes out."""
    rendered = decode(data, Rendered)
    store: JobStore = ctx["store"]

    async def body(record: JobRecord) -> str:
        await store.count_run(job_id, NOTIFY.name)
        done = await store.transition(job_id, dag.DONE, expect=RENDER.state, outputs=rendered.outputs)
        if done is None:
            return "already done"
        await store.remember_done(done)
        try:  # the batches' audio is only needed while transcribing
            await stage_ctx(ctx).storage.delete_prefix(f"{keys.job_prefix(job_id)}/batches")
        except errors.VtpError as exc:
            log.warning("job %s: could not delete its batch audio: %s", job_id, exc)
        return f"done in {done.wall_seconds:.1f} s"

    return await run_stage(ctx, job_id, NOTIFY, body)


async def webhook_task(ctx: dict, job_id: str) -> str:
    """One delivery attempt of a finished job's webhook (``app.webhooks``); arq runs it again
    after the backoff until it is delivered or given up."""
    try:
        wait = await webhooks.deliver(ctx["store"], ctx["settings"], ctx["guard"], job_id)
    except errors.QueueError as exc:
        log.warning("webhook of job %s: %s; retrying", job_id, exc)
        raise Retry(defer=ctx["settings"].webhook_retry_delay) from exc
    if wait is None:
        return "webhook settled"
    raise Retry(defer=wait)


#: arq task name -> task: what ``workers.runtime.worker`` registers for each stage of the table.
TASKS = {
    constants.FN_EXTRACT: extract_task,
    constants.FN_SEGMENT: segment_task,
    constants.FN_TRANSCRIBE: transcribe_task,
    constants.FN_MERGE: merge_task,
    constants.FN_RENDER: render_task,
    constants.FN_NOTIFY: notify_task,
}
