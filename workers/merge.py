"""Fan-in: batch results -> one ordered transcript.

Chunks never overlap (they are disjoint stretches cut at pauses), so merging is ordering, not
stitching: no word can appear in two chunks. Results of a retried batch may arrive twice;
they are keyed by batch index so each counts once.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from app.messages import BatchTranscript, CoverageStats, Segment, Segmentation, Transcript, TranscriptStats
from workers.spans import merge as merge_spans


def merge_parts(
    parts: list[BatchTranscript], segmentation: Segmentation, duration: float, *, engine: str, model: str,
    task: str = "transcribe",
) -> Transcript:
    by_batch = {p.batch_index: p for p in parts}  # a retried batch counts once
    ordered = sorted(
        (s for p in by_batch.values() for s in p.segments), key=lambda s: (s.chunk, s.start, s.end)
    )
    segments: list[Segment] = []
    last_start = 0.0
    for seg in ordered:
        start = min(max(seg.start, last_start), duration)
        end = min(max(seg.end, start), duration)
        if (start, end) != (seg.start, seg.end):
            seg = msgspec.structs.replace(seg, start=start, end=end)
        segments.append(seg)
        last_start = start
    language = _majority_language(list(by_batch.values()))
    stats = TranscriptStats(
        engine=engine,
        model=model,
        chunks=len(segmentation.chunks),
        speech_seconds=round(segmentation.speech_seconds, 3),
        coverage=sum((p.coverage for p in by_batch.values()), CoverageStats()),
    )
    speech = merge_spans([span for p in by_batch.values() for span in p.speech])
    unheard = merge_spans([span for p in by_batch.values() for span in p.unheard])
    return Transcript(
        language=language, duration=round(duration, 3), segments=segments, stats=stats, speech=speech, unheard=unheard,
        task=task,
    )


def _majority_language(parts: list[BatchTranscript]) -> str:
    votes: Counter[str] = Counter()
    for p in parts:
        votes[p.language] += p.audio_seconds
    return votes.most_common(1)[0][0] if votes else "en"


def with_timings(transcript: Transcript, timings: dict[str, float], wall: float) -> Transcript:
    """``transcript`` with its wall time, realtime factor and per-stage seconds (both runners)."""
    stats = msgspec.structs.replace(
        transcript.stats,
        wall_seconds=round(wall, 3),
        realtime_factor=round(transcript.duration / wall, 2) if wall > 0 else 0.0,
        stages=timings,
    )
    return msgspec.structs.replace(transcript, stats=stats)
