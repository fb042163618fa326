"""The engine interface: a batch of audio chunks in, timestamped segments out.

Engines are synchronous and CPU/GPU-bound; stages call them from a worker thread. One
``EnginePool`` per process keeps loaded models, keyed by what makes a model different, so a
worker that serves many jobs loads each model once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from app import errors
from app.messages import Chunk, Segment, TranscribeOptions


class Engine(Protocol):
    name: str
    model_name: str

    def transcribe_batch(
        self, audio: list[np.ndarray], chunks: list[Chunk], options: TranscribeOptions
    ) -> tuple[list[Segment], str]:
        """Transcribe ``audio[i]`` (float32, 16 kHz), the audio of ``chunks[i]`` (its pieces joined).

        Returns segments with source timestamps (``Chunk.to_source``), in chunk order, and the language.
        """
        ...


EngineKey = tuple[str, str, str, str]


def engine_key(options: TranscribeOptions) -> EngineKey:
    return (options.engine, options.model, options.device, options.compute_type)


class EnginePool:
    """Loads each distinct engine once per process and hands out the loaded instance."""

    def __init__(self, factory: Callable[[TranscribeOptions], Engine] | None = None) -> None:
        self._factory = factory or load_engine
        self._engines: dict[EngineKey, Engine] = {}
        self._lock = threading.Lock()

    def get(self, options: TranscribeOptions) -> Engine:
        key = engine_key(options)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = self._factory(options)
            return engine


def load_engine(options: TranscribeOptions) -> Engine:
    if options.engine == "ctranslate2":
        from workers.engines.ctranslate2 import FasterWhisperEngine

        return FasterWhisperEngine.load(options)
    if options.engine == "transformers":
        from workers.engines.transformers import TransformersEngine

        return TransformersEngine.load(options)
    if options.engine == "noop":
        from workers.engines.noop import NoopEngine

        return NoopEngine(options)
    raise errors.OptionsError(f"unknown engine {options.engine!r}")
