"""The per-process ``EnginePool``: each distinct engine loaded once, by name (``load_engine``).

The concrete engines import ``workers.engines.base`` for the interface; this module imports them
(lazily: a process loads only the engine it uses), so base never imports an engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from app import errors
from app.messages import TranscribeOptions
from workers.engines.base import Engine


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
