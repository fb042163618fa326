"""Which language every chunk is decoded in: the job's own, never a batch neighbour's.

A multilingual model decodes a call in one language (the language token of its prompt). So a
multilingual engine is only ever called with a concrete ``options.language``:

* **Once per job** (the default when a job names no language): ``job_language`` takes a vote
  over the job's first speech (its first ``DETECT_CHUNKS`` chunks, each weighing its seconds times
  the model's confidence) before any of its chunks is decoded, and the runners put the winner
  into the job's options (``local_runner``; ``workers.runtime.tasks`` records it on the job, first detection
  wins, so every batch of the job agrees). Every chunk is then decoded in it, whatever else
  shares the model call.
* **Per chunk** (``TranscribeOptions.language_per_chunk``, for mixed-language media):
  ``transcribe_by_language`` detects each chunk's language and makes one engine call per
  language.

``decode_in_language`` is the one door the transcribe stage goes through (``ByLanguage``), and
the GPU batcher routes a request without a language the same way before it queues it, and keys
its groups by language: no shared call mixes languages.
"""

from __future__ import annotations

from collections import Counter

import msgspec
import numpy as np

from app.messages import SAMPLE_RATE, Chunk, Segment, TranscribeOptions
from workers.engines.base import FAST, Decoding, Engine

#: How much of a job's first speech votes on its language: several chunks, not one.
DETECT_CHUNKS = 5


def needs_job_language(options: TranscribeOptions) -> bool:
    """The job names no language and wants one for all its chunks: detect it before decoding."""
    return options.language is None and not options.language_per_chunk and options.engine != "noop"


def multilingual(engine: object) -> bool:
    return bool(getattr(engine, "multilingual", False))


def vote(detected: list[tuple[str, float]], seconds: list[float]) -> str:
    """The language with the most seconds x confidence."""
    votes: Counter[str] = Counter()
    for (lang, prob), s in zip(detected, seconds):
        votes[lang] += max(s, 0.01) * prob
    return votes.most_common(1)[0][0] if votes else "en"


def job_language(engine: Engine, audio: list[np.ndarray]) -> str:
    """The language of a job from its first chunks (``audio[i]``, in order); ``en`` on an
    English-only model, without running it."""
    if not multilingual(engine) or not audio:
        return "en"
    first = audio[:DETECT_CHUNKS]
    return vote(engine.detect_languages(first), [a.size / SAMPLE_RATE for a in first])


def transcribe_by_language(
    engine: Engine, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
) -> tuple[list[Segment], str]:
    """Each chunk decoded in its own detected language: one engine call per language, segments
    back in chunk order; the language returned is the one with the most seconds."""
    detected = engine.detect_languages(audio)
    groups: dict[str, list[int]] = {}
    for i, (lang, _prob) in enumerate(detected):
        groups.setdefault(lang, []).append(i)
    by_chunk: dict[int, list[Segment]] = {}
    for lang, rows in groups.items():
        segments, _ = engine.transcribe_batch(
            [audio[i] for i in rows], [chunks[i] for i in rows], msgspec.structs.replace(options, language=lang), decoding
        )
        for seg in segments:
            by_chunk.setdefault(seg.chunk, []).append(seg)
    ordered = [seg for c in dict.fromkeys(c.index for c in chunks) for seg in by_chunk.get(c, [])]
    return ordered, vote([(lang, 1.0) for lang, _ in detected], [a.size / SAMPLE_RATE for a in audio])


def decode_in_language(
    engine: Engine, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
) -> tuple[list[Segment], str]:
    """``engine.transcribe_batch`` with a concrete language for a multilingual engine: the
    options' own, else each chunk's detected one."""
    if options.language is not None or not multilingual(engine) or not audio:
        return engine.transcribe_batch(audio, chunks, options, decoding)
    return transcribe_by_language(engine, audio, chunks, options, decoding)


class ByLanguage:
    """An Engine that decodes every chunk in a concrete language (``decode_in_language``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name
        self.model_name = engine.model_name
        self.multilingual = multilingual(engine)
        self.parallel_calls = getattr(engine, "parallel_calls", 1)

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        return self.engine.detect_languages(audio)

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        return decode_in_language(self.engine, audio, chunks, options, decoding)
