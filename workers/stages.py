"""The DAG's stages: plain typed async functions, one msgspec message in, one out.

    extract_audio ─> segment ─┬─> transcribe (batch 0) ─┐
                              ├─> transcribe (batch 1) ─┼─> merge ─> render
                              └─> ...                   ┘

Stages know nothing of queues or of each other: ``local_runner`` calls them in one process,
``workers.runtime.tasks`` calls the very same functions as arq jobs on many machines. Everything a stage
needs from outside comes in its ``StageContext``; everything it hands on goes through
storage keys inside its return message, so consecutive stages may run on different hosts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np

from app import errors, formats
from app.config import Settings
from app.messages import (
    SAMPLE_RATE,
    BatchTranscript,
    ChunkBatch,
    ExtractedAudio,
    ExtractRequest,
    LanguageRequest,
    MergeRequest,
    Rendered,
    RenderRequest,
    Segmentation,
    SegmentRequest,
    Transcript,
    TranscribeRequest,
)
from app.keys import audio_key, batch_audio_key, job_prefix, media_key, output_key, review_key
from app.storage import Storage
from workers import audio, coverage, languages, merge as merging, vad
from workers.batcher import Cancellable, CancelToken
from workers.engines.pool import EnginePool

#: How a long stage reports how far it got: (seconds of audio done, seconds in all, 0 if unknown).
Progress = Callable[[float, float], Awaitable[None]]


@dataclass
class StageContext:
    storage: Storage
    settings: Settings
    engines: EnginePool = field(default_factory=EnginePool)
    chunking: vad.ChunkingOptions = field(default_factory=vad.ChunkingOptions)
    coverage: coverage.CoverageOptions = field(default_factory=coverage.CoverageOptions)


async def extract_audio(ctx: StageContext, req: ExtractRequest, progress: Progress | None = None) -> ExtractedAudio:
    """ffmpeg: the first audio stream of the media -> 16 kHz mono PCM in storage.

    More audio than ``VTP_MAX_DURATION`` is refused (``MediaTooLong``): from the declared
    duration before decoding, else once decoding passes the limit."""
    name = req.source_name or "input"
    key = audio_key(req.job_id)
    async with ctx.storage.local_path(req.media_key) as source:
        audio.check_input_file(source, max_bytes=ctx.settings.max_input_bytes)
        async with ctx.storage.new_local_file(key, suffix=".pcm") as dest:
            duration = await audio.extract_pcm(
                source, dest, name=name, timeout=ctx.settings.ffmpeg_timeout,
                max_seconds=ctx.settings.max_duration_seconds, progress=progress,
            )
    return ExtractedAudio(audio_key=key, duration=round(duration, 3))


async def segment(ctx: StageContext, req: SegmentRequest, progress: Progress | None = None) -> Segmentation:
    """VAD: speech chunks of at most one Whisper window, grouped into batches stored for fan-out.

    Memory stays flat in the input's length: the VAD reads the PCM in blocks, and each batch's
    audio is read back from the file by its chunks' byte ranges.
    """
    async with ctx.storage.local_path(req.audio.audio_key) as path:
        read, samples = vad.pcm_reader(path)
        found = await anyio.to_thread.run_sync(vad.scan, read, samples, ctx.chunking, _blocking(progress))
        chunks = vad.plan_chunks(found, ctx.chunking)
        size = req.options.batch_size
        batches: list[ChunkBatch] = []
        for index, start in enumerate(range(0, len(chunks), size)):
            members = chunks[start : start + size]
            key = batch_audio_key(req.job_id, index)
            # int16 slices of the extracted PCM: half the bytes of float32 on the wire to GPU hosts.
            data = await anyio.to_thread.run_sync(_read_ranges, path, [r for c in members for r in c.sample_ranges])
            await ctx.storage.put_bytes(key, data)
            batches.append(ChunkBatch(index=index, chunks=members, audio_key=key))
    speech = sum(c.duration for c in chunks)
    return Segmentation(chunks=chunks, batches=batches, speech_seconds=round(speech, 3))


def _read_ranges(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    with path.open("rb") as f:
        pieces = []
        for first, last in ranges:
            f.seek(first * 2)
            pieces.append(f.read((last - first) * 2))
    return b"".join(pieces)


def _blocking(progress: Progress | None) -> Callable[[int, int], None] | None:
    """``progress`` for code in a worker thread that counts samples."""
    if progress is None:
        return None
    rate = float(SAMPLE_RATE)
    return lambda done, total: anyio.from_thread.run(progress, done / rate, total / rate)


def split_batch_audio(data: bytes, batch: ChunkBatch) -> list[np.ndarray]:
    samples = audio.pcm_to_float(data)
    out, pos = [], 0
    for c in batch.chunks:
        n = c.samples
        out.append(samples[pos : pos + n])
        pos += n
    if pos != samples.size:
        raise errors.StorageError(f"batch {batch.index} audio holds {samples.size} samples, expected {pos}")
    return out


async def transcribe(ctx: StageContext, req: TranscribeRequest) -> BatchTranscript:
    """The engine on one batch of chunks, with the coverage guarantee: the GPU stage, the only
    one that holds a model."""
    started = time.perf_counter()
    data = await ctx.storage.get_bytes(req.batch.audio_key)
    pieces = split_batch_audio(data, req.batch)
    engine = await anyio.to_thread.run_sync(ctx.engines.get, req.options)
    # Cancelled (its deadline passed, the worker stops at once): the thread is abandoned, and the
    # token makes it return soon, its chunks not yet decoded dropped from the GPU's queue. Every
    # call reaches the engine in a concrete language (``languages.ByLanguage``).
    token = CancelToken()
    try:
        covered = await anyio.to_thread.run_sync(
            coverage.transcribe_covered, languages.ByLanguage(Cancellable(engine, token)), pieces, req.batch.chunks,
            req.options, ctx.coverage, abandon_on_cancel=True,
        )
    finally:
        token.cancel()  # a no-op for work that is done
    return BatchTranscript(
        batch_index=req.batch.index,
        segments=covered.segments,
        language=covered.language,
        coverage=covered.stats,
        speech=covered.speech,
        unheard=covered.unheard,
        audio_seconds=round(req.batch.audio_seconds, 3),
        wall_seconds=round(time.perf_counter() - started, 3),
    )


async def detect_language(ctx: StageContext, req: LanguageRequest) -> str:
    """The job's language, voted on by its first ``languages.DETECT_CHUNKS`` chunks (read from
    the first batches only). ``en`` on an English-only model, without reading any audio. The
    runners call it once per job, before any of the job's chunks is decoded."""
    engine = await anyio.to_thread.run_sync(ctx.engines.get, req.options)
    if not languages.multilingual(engine):
        return "en"
    pieces: list[np.ndarray] = []
    for batch in req.batches:
        if len(pieces) >= languages.DETECT_CHUNKS:
            break
        pieces += split_batch_audio(await ctx.storage.get_bytes(batch.audio_key), batch)
    return await anyio.to_thread.run_sync(languages.job_language, engine, pieces[: languages.DETECT_CHUNKS])


async def merge(ctx: StageContext, req: MergeRequest) -> Transcript:
    """Fan-in: every batch's segments, in order, once each."""
    expected = {b.index for b in req.segmentation.batches}
    missing = expected - {p.batch_index for p in req.parts}
    if missing:
        raise errors.JobError(f"merge is missing the results of batches {sorted(missing)}")
    return merging.merge_parts(
        req.parts, req.segmentation, req.audio.duration, engine=req.options.engine, model=req.options.model,
        task=req.options.task,
    )


async def render(ctx: StageContext, req: RenderRequest) -> Rendered:
    """The transcript in each requested format, written to storage, and always its JSON under
    ``review_key`` (the job page's cues, subtitles and speech timeline; not an output)."""
    await ctx.storage.put_bytes(review_key(req.job_id), formats.to_json(req.transcript))
    outputs: dict[str, str] = {}
    for fmt in req.formats:
        key = output_key(req.job_id, req.basename, fmt)
        await ctx.storage.put_bytes(key, formats.RENDERERS[fmt](req.transcript))
        outputs[fmt] = key
    return Rendered(outputs=outputs)
