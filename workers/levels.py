"""Loudness: the level of every 100 ms, the file's noise floor, and the safety net built on them.

The VAD is good but not perfect: a voice in an odd room, far from the microphone or under
noise can be rejected even after conditioning. A stretch the VAD rejected that is still
*loud* — well above the file's own noise floor — is sent to Whisper anyway as a **probe
chunk**, and its words are kept only where Whisper itself is sure it heard speech
(``workers.coverage.probe_heard_speech``). Silence stays empty (it is never loud), and music or
noise stays out (Whisper says "no speech" there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.messages import SAMPLE_RATE
from workers import spans

#: Samples per level frame (100 ms).
FRAME = SAMPLE_RATE // 10
#: Digital silence and near-silence: never part of the noise floor.
SILENT_DB = -80.0


@dataclass(frozen=True)
class ProbeOptions:
    #: Off: the VAD alone decides what is transcribed.
    enabled: bool = True
    #: The noise floor is this percentile of the file's non-silent frame levels.
    floor_percentile: float = 15.0
    #: A frame this many dB above the floor is loud.
    margin_db: float = 12.0
    #: Loud stretches shorter than this are not probed (clicks, breaths, a cough).
    min_s: float = 1.0
    #: Loud frames this close together form one stretch.
    bridge_s: float = 0.5
    #: Audio kept either side of a loud stretch.
    pad_s: float = 0.2
    #: Loud audio this close to detected speech belongs to it (the VAD's own padding).
    guard_s: float = 0.3


class LevelMeter:
    """Frame levels (dB) of a signal fed in pieces; each frame is measured once."""

    def __init__(self) -> None:
        self.pos = 0  # first sample of the next frame
        self._parts: list[np.ndarray] = []

    def feed(self, audio: np.ndarray, first: int, *, until: int) -> None:
        """``audio`` holds samples ``first..``; measure the frames from ``pos`` up to ``until``
        (a partial frame only where ``until`` is the end of the audio)."""
        start = self.pos - first
        stop = min(until - first, audio.size)
        if stop <= start:
            return
        whole = (stop - start) // FRAME
        at_end = until - first >= audio.size
        usable = stop - start if at_end else whole * FRAME
        if usable <= 0:
            return
        piece = audio[start : start + usable].astype(np.float64)
        n = -(-usable // FRAME)
        padded = np.zeros(n * FRAME)
        padded[:usable] = piece**2
        counts = np.full(n, FRAME, dtype=np.float64)
        counts[-1] = usable - (n - 1) * FRAME
        power = padded.reshape(n, FRAME).sum(axis=1) / counts
        self._parts.append((10 * np.log10(np.maximum(power, 1e-12))).astype(np.float32))
        self.pos += usable

    def result(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)


def noise_floor(frame_db: np.ndarray, opts: ProbeOptions) -> float | None:
    audible = frame_db[frame_db > SILENT_DB]
    return float(np.percentile(audible, opts.floor_percentile)) if audible.size else None


def loud_rejected_stretches(
    frame_db: np.ndarray,
    regions: list[tuple[int, int]],
    taken: list[tuple[int, int]],
    samples: int,
    opts: ProbeOptions,
) -> list[tuple[int, int]]:
    """Sample ranges that are loud but outside every VAD region and every speech chunk."""
    floor = noise_floor(frame_db, opts) if opts.enabled else None
    if floor is None:
        return []
    loud = frame_db > floor + opts.margin_db
    guard = int(opts.guard_s * SAMPLE_RATE)
    for start, end in regions:
        loud[max(0, (start - guard) // FRAME) : (end + guard) // FRAME + 1] = False
    runs: list[tuple[int, int]] = []
    bridge = int(opts.bridge_s * SAMPLE_RATE)
    for index in np.flatnonzero(loud):
        start, end = int(index) * FRAME, min((int(index) + 1) * FRAME, samples)
        if runs and start - runs[-1][1] <= bridge:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    pad, shortest = int(opts.pad_s * SAMPLE_RATE), int(opts.min_s * SAMPLE_RATE)
    padded = [(max(0, s - pad), min(samples, e + pad)) for s, e in runs if e - s >= shortest]
    return [(s, e) for s, e in spans.subtract(padded, sorted(taken)) if e - s >= shortest]
