"""The engine interface: a batch of audio chunks in, timestamped segments out.

Engines are synchronous and CPU/GPU-bound; stages call them from a worker thread. One
``EnginePool`` per process (``workers.engines.pool``) keeps loaded models, keyed by what makes a model different, so a
worker that serves many jobs loads each model once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.messages import Chunk, Segment, TranscribeOptions


#: Whisper's own thresholds (OpenAI's ``transcribe`` defaults), shared by every engine and the
#: coverage ladder: a decode whose text compresses better than this is looping; one whose average
#: log-probability is below this is unsure; "nothing was said" needs a no-speech probability
#: above its threshold *and* an unsure decode.
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
#: Whisper's temperature fallback after the greedy/beam decode (OpenAI's defaults, 0.2 steps).
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Decoding:
    """How an engine decodes a batch: the fast default, or one rung of the coverage ladder.

    * ``timestamps``: decode *with* timestamp tokens (the prompt without ``<|notimestamps|>``,
      Whisper's timestamp rules), the way sequential Whisper does. Some windows that end at
      once without them are decoded in full with them. Words are still timed by alignment; the
      timestamp tokens only steer the decoder and never reach the text.
    * ``temperatures``: Whisper's fallback. Every row is decoded at the first; a row whose
      output fails the checks (compression ratio above ``COMPRESSION_RATIO_THRESHOLD`` or average
      log-probability below ``LOGPROB_THRESHOLD``), unless Whisper judges it silence, is decoded
      again at the next (temperature > 0: sampling, best of 5), and the first that passes, or
      the last, is kept. Only the rows that failed are decoded again.

    Every engine honours both in one batched call per temperature; the default is one call.
    """

    timestamps: bool = False
    temperatures: tuple[float, ...] = (0.0,)

    @property
    def label(self) -> str:
        parts = ["timestamps" if self.timestamps else "no-timestamps"]
        if self.temperatures != (0.0,):
            parts.append("T=" + ",".join(f"{t:g}" for t in self.temperatures))
        return " ".join(parts)


def compression_ratio(text: str) -> float:
    """Whisper's looping check: the text's bytes over its zlib-compressed bytes (OpenAI's and
    faster-whisper's formula). Ordinary speech is about 1.5-2; a decode that repeats itself is
    above ``COMPRESSION_RATIO_THRESHOLD``."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def needs_fallback(text: str, avg_logprob: float, no_speech_prob: float) -> bool:
    """Whisper's rule for decoding a window again at the next temperature: the text loops or the
    decoder was unsure, unless Whisper judges the window silence (then there is nothing to find)."""
    failed = compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD or avg_logprob < LOGPROB_THRESHOLD
    return failed and not said_nothing(no_speech_prob, avg_logprob)


def said_nothing(no_speech_prob: float, avg_logprob: float) -> bool:
    """Whisper's verdict that nothing was said: a likely no-speech token *and* an unsure decode
    (both must hold). Every engine drops such a window's text: no hallucinated words in noise."""
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD


#: The most text tokens a second of audio can need: fast English (about 4 words a second) takes 5-6,
#: scripts that tokenize into many pieces (byte fallback) several times that. A decode past the
#: budget is a loop (Whisper repeating a phrase until its 448-token limit), not speech.
TOKENS_PER_SECOND = {"en": 12}
TOKENS_PER_SECOND_OTHER = 30
TOKEN_SLACK = 24


def token_budget(seconds: float, language: str | None, limit: int) -> int:
    """Tokens a decode of ``seconds`` of audio may generate, at most ``limit`` (the model's).
    Engines cap every call by its longest audio: a looping row (in the fast decode, or a ladder
    rung's piece of a few seconds) then stops within its budget instead of running every step
    to 448 tokens; beam search and sampling cost in proportion."""
    rate = TOKENS_PER_SECOND.get(language or "", TOKENS_PER_SECOND_OTHER)
    return max(1, min(limit, int(seconds * rate + 0.999) + TOKEN_SLACK))


#: The fast batched decode: no timestamp tokens, one temperature (0: beam search).
FAST = Decoding()


class Engine(Protocol):
    name: str
    model_name: str
    #: False for English-only models (``.en``): they hear English and cannot translate.
    multilingual: bool
    #: How many ``transcribe_batch`` calls the engine runs at once to advantage, from as many
    #: threads (CTranslate2 on CPU: its workers; 1 elsewhere, and where a test double has none).
    #: The coverage ladder decodes the next rung beside a call too small to keep them busy
    #: (``coverage.climb``).
    parallel_calls: int

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        """Each chunk's most likely language and its probability (``("en", 1.0)`` for every chunk
        on an English-only model)."""
        ...

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        """Transcribe ``audio[i]`` (float32, 16 kHz), the audio of ``chunks[i]`` (its pieces joined).

        Returns segments with source timestamps (``Chunk.to_source``), in chunk order, and the
        language. ``options.task`` ``translate`` gives English text (``OptionsError`` on an
        English-only model). Callers pass a concrete ``options.language`` to a multilingual
        engine (``workers.languages.decode_in_language``); given None, an engine guesses one
        language for the whole call. ``decoding`` picks the fast decode or a rung of the coverage ladder.
        """
        ...
