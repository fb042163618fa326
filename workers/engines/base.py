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
    * ``window_pad_s``: the window a call's audio is decoded in. None: Whisper's 30 s (the audio
      padded with silence to 30 s, as Whisper was trained and as the first pass decodes every
      chunk). A number: the call's longest audio plus that much silence, rounded up to whole
      seconds, at most 30 s (``window_frames``): the coverage ladder's pieces, a few seconds
      each, cost a fraction of a 30 s window, and tiny.en decodes them no worse in a window
      fitted to them (1.5-12 s spans of the generated corpus, 5 s of padding: WER 17.7% against
      20.7%, deletions 1.6% against 2.1%, 2.8x less time; 1 s of padding was worse:
      ``docs/logs/experiments/short_windows.log``). An engine whose encoder takes only 30 s
      windows (transformers) decodes in 30 s whatever this says.

    Every engine honours the first two in one batched call per temperature; the default is one call.
    """

    timestamps: bool = False
    temperatures: tuple[float, ...] = (0.0,)
    window_pad_s: float | None = None

    @property
    def label(self) -> str:
        parts = ["timestamps" if self.timestamps else "no-timestamps"]
        if self.temperatures != (0.0,):
            parts.append("T=" + ",".join(f"{t:g}" for t in self.temperatures))
        if self.window_pad_s is not None:
            parts.append(f"window +{self.window_pad_s:g} s")
        return " ".join(parts)


#: Whisper's window in feature frames (30 s of 10 ms frames).
WINDOW_FRAMES = 3000


def window_frames(frames: int, pad_s: float | None) -> int:
    """The encoder input's frames for audio of ``frames`` feature frames (``Decoding.window_pad_s``):
    Whisper's 3000 without padding asked for, else the audio plus ``pad_s`` seconds rounded up to
    whole seconds, at most 3000."""
    if pad_s is None:
        return WINDOW_FRAMES
    return min(WINDOW_FRAMES, -(-(frames + round(pad_s * 100)) // 100) * 100)


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
