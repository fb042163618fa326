"""The GPU worker's engines: its own hardware, an allow-list of models loaded at start, one
``GpuBatcher`` per model shared by the jobs it runs at once.

The worker owns its hardware: engine, device and compute type come from its settings
(``VTP_ENGINE``, ``VTP_DEVICE``, ``VTP_COMPUTE_TYPE``), whatever a job carries (those fields
of ``TranscribeOptions`` still drive ``vtp transcribe``, which runs on the caller's machine).
A job names at most a model: one from ``VTP_MODELS``; a job that kept the default model name
gets the worker's default (the first of ``VTP_MODELS``), any other name fails the job at once.
Every model is loaded before the worker takes its first job, so a transcribe deadline never
includes a model load.

``ctx.engines`` of the stages on a GPU worker is a ``GpuEngines``: ``get(options)`` returns the
model's batcher, which is itself an Engine, so ``stages.transcribe`` is the same code here and
in ``vtp transcribe``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import msgspec

from app import errors
from app.config import Settings
from app.messages import TranscribeOptions
from workers.batcher import GpuBatcher
from workers.engines.base import Engine
from workers.engines.pool import load_engine

log = logging.getLogger("vtp.worker")

#: What a job carries when it names no model (the CLI's default).
DEFAULT_MODEL = TranscribeOptions().model


def cuda_available() -> bool:
    """Asks CTranslate2 first (imported anyway, and in milliseconds; torch takes seconds), then
    torch if CTranslate2 is missing. ``VTP_DEVICE=cuda`` skips the question."""
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@dataclass(frozen=True)
class Hardware:
    engine: str
    device: str
    compute_type: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Hardware:
        cuda = None

        def has_cuda() -> bool:
            nonlocal cuda
            if cuda is None:
                cuda = cuda_available()
            return cuda

        device = settings.device
        if device == "auto":
            device = "cuda" if has_cuda() else "cpu"
        if device not in ("cpu", "cuda"):
            raise errors.OptionsError(f"VTP_DEVICE={settings.device!r}: use cuda, cpu or auto")
        engine = settings.engine
        if engine == "auto":
            # transformers (fp16, SDPA, batched across jobs) on a GPU when it is installed;
            # CTranslate2's int8 is the faster engine on CPU (docs/benchmarks.md).
            engine = "transformers" if device == "cuda" and _installed("transformers") else "ctranslate2"
        if engine not in ("ctranslate2", "transformers", "noop"):
            raise errors.OptionsError(f"VTP_ENGINE={settings.engine!r}: use transformers, ctranslate2 or auto")
        compute = settings.compute_type
        if compute == "auto":
            compute = "float16" if device == "cuda" else ("int8" if engine == "ctranslate2" else "float32")
        return cls(engine, device, compute)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class GpuEngines:
    """An ``EnginePool`` for the GPU worker (same ``get``), bound to the worker's settings."""

    def __init__(self, settings: Settings, *, factory=load_engine) -> None:
        self.settings = settings
        self.hardware = Hardware.from_settings(settings)
        self.models = settings.model_list
        self._factory = factory
        #: Measured on an H100 (docs/benchmarks.md): large-v3 greedy 316x realtime at 32 chunks
        #: per call vs 206x at 16, and 300x at beam 5 (44 GB); 4 jobs x VTP_BATCH_SIZE 8 fill 32.
        self.decode_batch = settings.decode_batch or (32 if self.hardware.device == "cuda" else 16)
        self._batchers: dict[str, GpuBatcher] = {}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        """Load every allowed model (blocking: call it from a thread, before taking work)."""
        for model in self.models:
            with self._lock:
                if model in self._batchers:
                    continue
            engine = self._factory(self.options_for(TranscribeOptions(model=model)))
            with self._lock:
                self._batchers[model] = GpuBatcher(
                    engine, batch_size=self.decode_batch, max_wait_ms=self.settings.batch_wait_ms
                )
            log.info("loaded %s (%s on %s, %s)", model, self.hardware.engine, self.hardware.device, self.hardware.compute_type)

    def options_for(self, options: TranscribeOptions) -> TranscribeOptions:
        """The job's options with the worker's hardware and the model it may use."""
        model = options.model
        if model not in self.models:
            if model != DEFAULT_MODEL:
                raise errors.OptionsError(
                    f"model {model!r} is not served by the GPU workers (VTP_MODELS={','.join(self.models)})"
                )
            model = self.models[0]
        hw = self.hardware
        return msgspec.structs.replace(options, model=model, engine=hw.engine, device=hw.device, compute_type=hw.compute_type)

    def get(self, options: TranscribeOptions) -> Engine:
        if options.engine == "noop":  # measures the queue itself (bench/queue_overhead.py): no hardware, no model
            return self._factory(options)
        resolved = self.options_for(options)
        with self._lock:
            batcher = self._batchers.get(resolved.model)
        if batcher is None:  # not loaded at start (load_all not called): load now
            self.load_all()
            batcher = self._batchers[resolved.model]
        return batcher

    def describe(self) -> str:
        """What the health key adds: the loaded models and the hardware."""
        hw = self.hardware
        loaded = ",".join(m for m in self.models if m in self._batchers) or "-"
        return f"models={loaded} engine={hw.engine} device={hw.device} compute_type={hw.compute_type}"

    def stats(self) -> dict[str, float | str]:
        """Batching counters summed over the models (published for ``/metrics``)."""
        total: dict[str, float] = {}
        for b in self._batchers.values():
            for k, v in b.stats.as_dict().items():
                total[k] = total.get(k, 0) + v
        slots = total.get("slots", 0)
        total["fill_ratio"] = round(total.get("chunks", 0) / slots, 4) if slots else 0.0
        total["decode_batch"] = self.decode_batch
        return {**total, "models": ",".join(self._batchers), "engine": self.hardware.engine, "device": self.hardware.device}

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()
