"""Speech chunking: Silero VAD (the ONNX model inside faster-whisper) -> chunks cut at pauses.

A chunk packs consecutive speech regions up to ``max_chunk_s`` of heard audio, kept below
Whisper's 30 s window on purpose: Whisper silently drops whatever falls past 30 s, which is how
batched pipelines lose words when VAD padding pushes a chunk over the edge. Pauses longer than
``cut_pause_s`` are cut out of the chunk's audio and never transcribed (no hallucinations in
silence, no window spent on it, and Whisper does not stop early at a long pause); the chunk
keeps the source spans it joined (``Chunk.pieces``) and words are timed back through them.

**The VAD hears a conditioned copy, and the original.** Silero misses speech under loud
low-frequency noise (hum, rumble, a different room): measured on speech 37 dB below such noise,
it found no speech at all. A high-pass filter (``highpass_hz``) on the VAD's copy removes that
band and it finds all of it, while noise alone stays silent. But the filtered copy alone clips
low voices where speech starts after a silence (measured: JFK's "And so" after 20 s of silence,
0.9 s of speech, never reached Whisper), so Silero also runs on the original around each
region's onset, and a region starts where that pass heard it start (``onset_lookback_s``).
Whisper hears the original audio.

**Regions keep the VAD's own cuts.** Regions that touch (Silero split them at a pause of at
least ``min_silence_ms``, and the padding joined them again) stay separate in ``Scan.regions``:
chunks are packed from them, so a chunk may end between two sentences of a paragraph, and a
paragraph longer than the window is cut at a pause, not at exactly ``max_chunk_s``.

**Streaming.** ``scan`` reads the audio through a ``read(first, end)`` callable in blocks of
``block_s`` seconds (a PCM file is read with ``np.fromfile``, never loaded whole), so memory is
flat however long the input. Each block starts a little before the previous one's end
(``LEAD_S``: the filter and the VAD's recurrent state settle), and a speech region that may go
on past a block's end is left to the next block, which starts where that region starts. The
scan also keeps the level of every 100 ms of the conditioned audio (``workers.levels``), a few
hundred kilobytes for hours, for the safety net that sends loud stretches the VAD rejected to
Whisper.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from faster_whisper.vad import VadOptions, get_speech_timestamps

from app.messages import SAMPLE_RATE, WHISPER_WINDOW_S, Chunk
from workers import levels, spans

#: Audio read before a block's start so the filter and the VAD's state have settled by it.
LEAD_S = 2.0
#: A region ending this close to a block's end may continue: the next block decides it.
TAIL_S = 5.0

Reader = Callable[[int, int], np.ndarray]
BlockDone = Callable[[int, int], None]


@dataclass(frozen=True)
class ChunkingOptions:
    #: Upper bound of a chunk: the whole window, less a margin for sample rounding. Packing
    #: close to 30 s matters: each chunk costs one full encoder pass whatever its length.
    max_chunk_s: float = WHISPER_WINDOW_S - 0.1
    #: A pause at least this long is a place to cut; shorter pauses stay inside a region.
    min_silence_ms: int = 300
    #: Audio kept either side of detected speech so word edges are not clipped.
    speech_pad_ms: int = 300
    #: A pause longer than this between two speech regions is cut out of the chunk's audio:
    #: Whisper hears the speech either side joined, with their pads (``speech_pad_ms`` each) as
    #: the pause, and word times are mapped back (``Chunk.pieces``). Long pauses inside a
    #: window made Whisper stop decoding early and filled windows with silence.
    cut_pause_s: float = 1.0
    #: Speech probability above which a frame is speech.
    threshold: float = 0.5
    #: Regions shorter than this are dropped (clicks, breaths).
    min_speech_ms: int = 120
    #: High-pass cutoff of the VAD's copy of the audio (0: off), the middle of a 100 Hz ramp.
    #: Speech keeps its formants above it; hum and rumble, which blind Silero, live below it.
    highpass_hz: float = 300.0
    #: How much earlier a region may start where Silero on the original (unfiltered) audio
    #: heard its speech start: the high-passed copy alone clips low voices' first words.
    onset_lookback_s: float = 1.5
    #: Seconds of audio the VAD holds at once: bounds memory whatever the input length.
    block_s: float = 60.0
    #: The safety net for loud stretches the VAD rejected (``workers.levels``).
    probes: levels.ProbeOptions = field(default_factory=levels.ProbeOptions)


@dataclass
class Scan:
    """What one pass over the audio found."""

    samples: int
    #: Sample ranges of speech, ordered and disjoint (touching where the VAD cut at a pause), each
    #: within ``max_chunk_s``.
    regions: list[tuple[int, int]]
    #: Level (dB) of each ``levels.FRAME`` samples of the conditioned audio.
    frame_db: np.ndarray


@functools.lru_cache(maxsize=8)
def _highpass_gain(size: int, cutoff_hz: float) -> np.ndarray:
    """A raised-cosine ramp from 0 to 1 over ``cutoff_hz`` ± 50 Hz, per rfft bin."""
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    ramp = np.clip((freqs - (cutoff_hz - 50)) / 100, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


def condition(audio: np.ndarray, opts: ChunkingOptions) -> np.ndarray:
    """The VAD's copy of the audio: low-frequency noise filtered out.

    Filtered in the frequency domain, a block at a time: below ``highpass_hz - 50`` nothing
    passes (an 8th-order Butterworth at 300 Hz still passes 250 Hz hum at -13 dB), and it costs
    one FFT — a recursive filter measured 13x slower here, and its output decays into
    denormal floats that slowed the VAD by 75%. The smooth ramp keeps the filter's impulse
    response short, so only a few milliseconds at a block's edges see the wrap-around, inside
    the lead and the tail that ``scan`` leaves to the neighbouring blocks anyway.
    """
    if not opts.highpass_hz or audio.size == 0:
        return audio
    from scipy import fft

    size = fft.next_fast_len(audio.size, real=True)
    spectrum = fft.rfft(audio, size)
    spectrum *= _highpass_gain(size, opts.highpass_hz)
    return fft.irfft(spectrum, size)[: audio.size].astype(np.float32)


def _vad(conditioned: np.ndarray, opts: ChunkingOptions) -> list[tuple[int, int]]:
    if conditioned.size == 0:
        return []
    vad = VadOptions(
        threshold=opts.threshold,
        min_speech_duration_ms=opts.min_speech_ms,
        min_silence_duration_ms=opts.min_silence_ms,
        speech_pad_ms=opts.speech_pad_ms,
        # The padding is added after the split, so leave room for it on both sides.
        max_speech_duration_s=opts.max_chunk_s - 2 * opts.speech_pad_ms / 1000,
    )
    return [(int(r["start"]), int(r["end"])) for r in get_speech_timestamps(conditioned, vad, sampling_rate=SAMPLE_RATE)]


#: Where Silero hears speech in the original audio, given the regions the conditioned copy gave.
OnsetPass = Callable[[Reader, list[tuple[int, int]], ChunkingOptions], list[tuple[int, int]]]


def scan(
    read: Reader, samples: int, opts: ChunkingOptions, on_block: BlockDone | None = None, *,
    onsets: OnsetPass | None = None,
) -> Scan:
    """VAD and levels over ``samples`` samples of audio, ``block_s`` seconds at a time.
    ``onsets``: the pass over the original (``_original_onsets``; ``bench/vad_onsets.py`` passes
    a whole-audio one to compare)."""
    block = max(int(opts.block_s * SAMPLE_RATE), int((TAIL_S + 2 * opts.max_chunk_s) * SAMPLE_RATE))
    lead, tail = int(LEAD_S * SAMPLE_RATE), int(TAIL_S * SAMPLE_RATE)
    regions: list[tuple[int, int]] = []  # found in the conditioned copy
    meter = levels.LevelMeter()
    pos = 0
    while pos < samples:
        end = min(pos + block, samples)
        first = max(0, pos - lead)
        original = read(first, end)
        conditioned = condition(original, opts)
        last = end >= samples
        cut = end if last else end - tail
        nxt = cut
        for start, stop in _vad(conditioned, opts):
            start, stop = start + first, stop + first
            if not last and stop >= cut:  # may go on past this block: the next one decides
                nxt = min(nxt, start)
            elif stop > pos:  # regions ending before pos were found by the previous block
                regions.append((max(start, pos), stop))
        nxt = nxt if nxt > pos else cut
        meter.feed(conditioned, first, until=nxt if not last else end)
        if on_block:
            on_block(nxt if not last else end, samples)
        pos = nxt if not last else end
    limit = int(opts.max_chunk_s * SAMPLE_RATE)
    heard = _bounded(spans.merge(regions, touching=False), limit)
    if opts.highpass_hz:  # what Silero hears in the original, where it matters (see the docstring)
        heard = _earlier_onsets(heard, (onsets or _original_onsets)(read, heard, opts), opts)
    return Scan(samples=samples, regions=heard, frame_db=meter.result())


#: The pass over the original hears this much audio before the earliest onset it may move a
#: region to (Silero's state settles), and this much after the region's start.
ONSET_SETTLE_S = 0.5
ONSET_AFTER_S = 0.5
#: Threads the onset pass runs its windows on: the cores, up to 2 (the machines vtp is sized for).
ONSET_THREADS = min(2, os.cpu_count() or 1)


def _original_onsets(read: Reader, heard: list[tuple[int, int]], opts: ChunkingOptions) -> list[tuple[int, int]]:
    """Silero on the original audio, only around the regions' onsets: the stretches where
    ``_earlier_onsets`` may move a start (a region touching the one before it starts at a place
    the VAD itself cut, and keeps it): 2.5 s of audio per onset instead of all of it. Measured
    over the generated corpus against a pass over the whole original (``bench/vad_onsets.py``):
    48 s instead of 68 s, 99.5% of region starts within 0.1 s of that pass's (Silero's frames
    fall on another grid in a window of its own)."""
    before = int((opts.onset_lookback_s + ONSET_SETTLE_S) * SAMPLE_RATE)
    after = int(ONSET_AFTER_S * SAMPLE_RATE)
    windows = spans.merge(
        (max(0, start - before), start + after)
        for k, (start, _end) in enumerate(heard)
        if k == 0 or heard[k - 1][1] < start
    )
    def heard_in(window: tuple[int, int]) -> list[tuple[int, int]]:
        first, end = window
        return [(first + a, first + b) for a, b in _vad(read(first, end), opts)]

    # Each window is a VAD call of its own (its own state), so they run side by side on the
    # cores (Silero's ONNX runtime lets go of the GIL): the same regions, in less wall time.
    if len(windows) < 2 or ONSET_THREADS < 2:
        return spans.merge(r for w in windows for r in heard_in(w))
    with ThreadPoolExecutor(ONSET_THREADS, thread_name_prefix="onsets") as pool:
        return spans.merge(r for found in pool.map(heard_in, windows) for r in found)


def _earlier_onsets(heard: list[tuple[int, int]], original: list[tuple[int, int]], opts: ChunkingOptions) -> list[tuple[int, int]]:
    """Start a region where the pass over the original heard it start, up to ``onset_lookback_s``
    earlier (never into the region before, never past the window). Only onsets move: adding
    everything the original pass found changed the chunks' edges everywhere, and with them where
    Whisper merged a phrase that is said twice (measured: a lost run on the lecture-length file)."""
    lookback = int(opts.onset_lookback_s * SAMPLE_RATE)
    limit = int(opts.max_chunk_s * SAMPLE_RATE)
    out: list[tuple[int, int]] = []
    k = 0
    for start, end in heard:
        while k < len(original) and original[k][1] <= start:
            k += 1
        earliest = max(start - lookback, out[-1][1] if out else 0, end - limit)
        if k < len(original) and original[k][0] < start:
            start = max(original[k][0], earliest)
        out.append((start, end))
    return out


def pcm_reader(path: Path) -> tuple[Reader, int]:
    """Read s16le PCM from a file by sample ranges, as float32."""
    samples = path.stat().st_size // 2

    def read(first: int, end: int) -> np.ndarray:
        data = np.fromfile(path, dtype="<i2", count=end - first, offset=first * 2)
        return data.astype(np.float32) / 32768.0

    return read, samples


def array_reader(audio: np.ndarray) -> tuple[Reader, int]:
    return (lambda first, end: audio[first:end]), int(audio.size)


def speech_regions(audio: np.ndarray, opts: ChunkingOptions) -> list[tuple[int, int]]:
    """Sample ranges that hold speech, none longer than ``opts.max_chunk_s``."""
    return scan(*array_reader(audio), opts).regions


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
    """Greedily pack consecutive speech regions into chunks of at most ``max_chunk_s`` of heard
    audio, cutting out pauses longer than ``cut_pause_s`` (each chunk's ``pieces``).

    Each chunk remembers the speech regions it holds (``Chunk.speech``): the transcribe stage
    checks that every one of them is covered by words (``workers.coverage``).
    """
    limit = int(opts.max_chunk_s * SAMPLE_RATE)
    cut = int(opts.cut_pause_s * SAMPLE_RATE)
    groups: list[tuple[list[tuple[int, int]], list[list[int]]]] = []  # (regions, pieces)
    heard = 0
    for start, end in _bounded(regions, limit):
        if groups:
            members, pieces = groups[-1]
            joined = start - pieces[-1][1] <= cut
            added = end - (pieces[-1][1] if joined else start)
            if heard + added <= limit:
                members.append((start, end))
                if joined:
                    pieces[-1][1] = max(pieces[-1][1], end)
                else:
                    pieces.append([start, end])
                heard += added
                continue
        groups.append(([(start, end)], [[start, end]]))
        heard = end - start
    chunks = []
    for i, (members, pieces) in enumerate(groups):
        seconds = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in pieces]
        chunks.append(Chunk(
            index=i,
            start=seconds[0][0],
            end=seconds[-1][1],
            speech=[(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in spans.merge(members)],
            pieces=seconds if len(seconds) > 1 else [],
        ))
    return chunks


def plan_chunks(found: Scan, opts: ChunkingOptions) -> list[Chunk]:
    """Speech chunks, plus probe chunks for loud stretches the VAD rejected, in time order."""
    speech = chunk_regions(found.regions, opts)
    taken = [r for c in speech for r in c.sample_ranges]  # a loud cut pause gets its own probe
    stretches = levels.loud_rejected_stretches(found.frame_db, found.regions, taken, found.samples, opts.probes)
    probes = [
        Chunk(index=0, start=s / SAMPLE_RATE, end=e / SAMPLE_RATE, probe=True)
        for s, e in _bounded(stretches, int(opts.max_chunk_s * SAMPLE_RATE))
    ]
    ordered = sorted(speech + probes, key=lambda c: c.start)
    return [msgspec.structs.replace(c, index=i) for i, c in enumerate(ordered)]


def find_chunks(audio: np.ndarray, opts: ChunkingOptions | None = None) -> list[Chunk]:
    opts = opts or ChunkingOptions()
    return plan_chunks(scan(*array_reader(audio), opts), opts)
