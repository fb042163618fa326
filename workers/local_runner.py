"""Runs the stage DAG in one process: what ``vtp transcribe`` uses.

The same stage functions as the queue runtime (``workers.runtime``), called in order, with
artifacts in a private temporary directory (the input is linked in, not copied). Batches run one after another
on the one loaded model; each reports progress.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from app.config import Settings
from app.messages import (
    ExtractRequest,
    LanguageRequest,
    MergeRequest,
    ProgressEvent,
    RenderRequest,
    SegmentRequest,
    Transcript,
    TranscribeOptions,
    TranscribeRequest,
)
from app import dag, keys
from app.media import safe_basename  # noqa: F401 - used here and by app.cli
from app.storage import LocalStorage, download_outputs
from workers import audio, languages, stages, vad
from workers.coverage import CoverageOptions
from workers.engines.pool import EnginePool
from workers.merge import with_timings

ProgressSink = Callable[[ProgressEvent], None]


@dataclass
class LocalResult:
    transcript: Transcript
    outputs: dict[str, Path]


#: The stages in the DAG table's order (``app.dag``); this runner calls them one after another.
EXTRACT, SEGMENT, TRANSCRIBE, MERGE, RENDER = (dag.STAGE[n] for n in ("extract", "segment", "transcribe", "merge", "render"))


class LocalRunner:
    def __init__(
        self,
        settings: Settings,
        engines: EnginePool | None = None,
        *,
        chunking: vad.ChunkingOptions | None = None,
        coverage: CoverageOptions | None = None,
    ) -> None:
        self.settings = settings
        self.engines = engines or EnginePool()
        self.chunking = chunking or vad.ChunkingOptions()
        self.coverage = coverage or CoverageOptions()

    async def run(
        self,
        source: Path,
        options: TranscribeOptions,
        output_dir: Path,
        *,
        basename: str | None = None,
        on_progress: ProgressSink | None = None,
    ) -> LocalResult:
        job_id = uuid.uuid4().hex
        report = on_progress or (lambda _e: None)
        audio.check_input_file(source, max_bytes=self.settings.max_input_bytes)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="vtp-") as tmp:
            storage = LocalStorage(tmp)
            storage.adopt(keys.media_key(job_id), source)
            ctx = stages.StageContext(
                storage=storage, settings=self.settings, engines=self.engines, chunking=self.chunking, coverage=self.coverage
            )

            def clock(stage: str, t0: float) -> None:
                timings[stage] = round(time.perf_counter() - t0, 3)

            async def extracting(done: float, total: float) -> None:
                report(ProgressEvent(job_id=job_id, state=EXTRACT.state, audio_done=round(done, 3), audio_total=round(total, 3)))

            t0 = time.perf_counter()
            extracted = await stages.extract_audio(
                ctx,
                ExtractRequest(job_id=job_id, media_key=keys.media_key(job_id), source_name=source.name),
                progress=extracting,
            )
            clock(EXTRACT.name, t0)

            report(ProgressEvent(job_id=job_id, state=SEGMENT.state, audio_total=extracted.duration))
            t0 = time.perf_counter()
            async def segmenting(done: float, total: float) -> None:
                report(ProgressEvent(job_id=job_id, state=SEGMENT.state, audio_done=round(done, 3), audio_total=round(total, 3)))

            seg = await stages.segment(
                ctx, SegmentRequest(job_id=job_id, audio=extracted, options=options), progress=segmenting
            )
            clock(SEGMENT.name, t0)

            if languages.needs_job_language(options) and seg.batches:
                # once per job, from its first speech, before any chunk is decoded
                first = LanguageRequest(job_id=job_id, batches=seg.batches, options=options)
                options = msgspec.structs.replace(options, language=await stages.detect_language(ctx, first))
            total, done_chunks, done_audio = len(seg.chunks), 0, 0.0
            report(ProgressEvent(job_id=job_id, state=TRANSCRIBE.state, chunks_total=total, audio_total=seg.speech_seconds))
            t0 = time.perf_counter()
            parts = []
            for batch in seg.batches:
                parts.append(await stages.transcribe(ctx, TranscribeRequest(job_id=job_id, batch=batch, options=options)))
                done_chunks += len(batch.chunks)
                done_audio += batch.audio_seconds
                report(
                    ProgressEvent(
                        job_id=job_id,
                        state=TRANSCRIBE.state,
                        chunks_done=done_chunks,
                        chunks_total=total,
                        audio_done=round(done_audio, 3),
                        audio_total=seg.speech_seconds,
                    )
                )
            clock(TRANSCRIBE.name, t0)

            report(ProgressEvent(job_id=job_id, state=MERGE.state))
            t0 = time.perf_counter()
            transcript = await stages.merge(
                ctx, MergeRequest(job_id=job_id, audio=extracted, segmentation=seg, parts=parts, options=options)
            )
            clock(MERGE.name, t0)

            wall = time.perf_counter() - started
            transcript = with_timings(transcript, timings, wall)
            report(ProgressEvent(job_id=job_id, state=RENDER.state))
            name = basename or safe_basename(source.name)
            rendered = await stages.render(
                ctx, RenderRequest(job_id=job_id, transcript=transcript, formats=options.formats, basename=name)
            )
            outputs = await download_outputs(storage, rendered.outputs, output_dir, name)
        report(ProgressEvent(job_id=job_id, state=dag.DONE, audio_done=seg.speech_seconds, audio_total=seg.speech_seconds))
        return LocalResult(transcript=transcript, outputs=outputs)
