"""An engine that hears nothing, instantly: measures the pipeline and the queue without a model
(``bench/queue_overhead.py``)."""

from __future__ import annotations

import numpy as np

from app.messages import Chunk, Segment, TranscribeOptions
from workers.engines.base import FAST, Decoding


class NoopEngine:
    name = "noop"
    parallel_calls = 1
    multilingual = False

    def __init__(self, options: TranscribeOptions) -> None:
        self.model_name = options.model

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions, decoding: Decoding = FAST
    ) -> tuple[list[Segment], str]:
        return [], options.language or "en"

    def detect_languages(self, audio: list[np.ndarray]) -> list[tuple[str, float]]:
        return [("en", 1.0)] * len(audio)
