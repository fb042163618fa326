"""Speech chunking: Silero VAD (the ONNX model inside faster-whisper) -> chunks cut at pauses.

Each chunk is one contiguous stretch of the original audio, so its segments' timestamps are
simply offset by the chunk start. A chunk never exceeds ``max_chunk_s``, kept below Whisper's
30 s window on purpose: Whisper silently drops whatever falls past 30 s, which is how batched
pipelines lose words when VAD padding pushes a chunk over the edge. Pauses longer than
``max_gap_s`` end a chunk and are not transcribed at all (no hallucinations in silence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from faster_whisper.vad import VadOptions, get_speech_timestamps

from app.messages import SAMPLE_RATE, WHISPER_WINDOW_S, Chunk


@dataclass(frozen=True)
class ChunkingOptions:
    #: Upper bound of a chunk: the whole window, less a margin for sample rounding. Packing
    #: close to 30 s matters: each chunk costs one full encoder pass whatever its length.
    max_chunk_s: float = WHISPER_WINDOW_S - 0.1
    #: A pause at least this long is a place to cut; shorter pauses stay inside a region.
    min_silence_ms: int = 300
    #: Audio kept either side of detected speech so word edges are not clipped.
    speech_pad_ms: int = 300
    #: Silence longer than this between two speech regions ends a chunk and is skipped.
    max_gap_s: float = 3.0
    #: Speech probability above which a frame is speech.
    threshold: float = 0.5
    #: Regions shorter than this are dropped (clicks, breaths).
    min_speech_ms: int = 120


def speech_regions(audio: np.ndarray, opts: ChunkingOptions) -> list[tuple[int, int]]:
    """Sample ranges that hold speech, none longer than ``opts.max_chunk_s``."""
    if audio.size == 0:
        return []
    vad = VadOptions(
        threshold=opts.threshold,
        min_speech_duration_ms=opts.min_speech_ms,
        min_silence_duration_ms=opts.min_silence_ms,
        speech_pad_ms=opts.speech_pad_ms,
        # The padding is added after the split, so leave room for it on both sides.
        max_speech_duration_s=opts.max_chunk_s - 2 * opts.speech_pad_ms / 1000,
    )
    return [(int(r["start"]), int(r["end"])) for r in get_speech_timestamps(audio, vad, sampling_rate=SAMPLE_RATE)]


def _bounded(regions: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Belt and braces: never hand Whisper more than its window, whatever the VAD returned."""
    out: list[tuple[int, int]] = []
    for start, end in regions:
        while end - start > limit:
            out.append((start, start + limit))
            start += limit
        out.append((start, end))
    return out


def chunk_regions(regions: list[tuple[int, int]], opts: ChunkingOptions) -> list[Chunk]:
    """Greedily pack consecutive speech regions into chunks of at most ``max_chunk_s``."""
    limit = int(opts.max_chunk_s * SAMPLE_RATE)
    max_gap = int(opts.max_gap_s * SAMPLE_RATE)
    spans: list[tuple[int, int]] = []
    for start, end in _bounded(regions, limit):
        if spans:
            cur_start, cur_end = spans[-1]
            if end - cur_start <= limit and start - cur_end <= max_gap:
                spans[-1] = (cur_start, max(cur_end, end))
                continue
        spans.append((start, end))
    return [Chunk(index=i, start=s / SAMPLE_RATE, end=e / SAMPLE_RATE) for i, (s, e) in enumerate(spans)]


def find_chunks(audio: np.ndarray, opts: ChunkingOptions | None = None) -> list[Chunk]:
    opts = opts or ChunkingOptions()
    return chunk_regions(speech_regions(audio, opts), opts)
