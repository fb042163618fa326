"""Settings, parsed once from the environment into one typed object.

Every process (CLI, workers, web) calls ``Settings.from_env()`` at start and passes the result
down; nothing else reads ``os.environ``. Unset variables take the defaults below, which are
the right ones for a single host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from app import errors


def default_cache_dir() -> str:
    """Where converted models are cached (``$XDG_CACHE_HOME/vtp``, else ``~/.cache/vtp``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "vtp")


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "vtp")


@dataclass(frozen=True)
class Settings:
    #: ``REDIS_URL``: the queue and the job records.
    redis_url: str = "redis://localhost:6379/0"
    #: ``VTP_DATA_DIR``: artifacts of the local-directory storage backend.
    data_dir: str = ""
    #: ``VTP_STORAGE``: ``file:///dir`` or ``s3://bucket/prefix``; defaults to ``data_dir``.
    storage_url: str = ""
    #: ``VTP_BATCH_SIZE``: chunks per transcribe job (the fan-out unit).
    batch_size: int = 8
    #: ``VTP_FFMPEG_TIMEOUT``: seconds ffmpeg may take on one input before it is declared broken.
    ffmpeg_timeout: float = 3600.0
    #: ``VTP_MAX_INPUT_MB``: inputs larger than this are refused (0: no limit).
    max_input_mb: int = 0
    #: ``VTP_JOB_TRIES``: attempts per stage job before the job is failed.
    job_tries: int = 4
    #: ``VTP_TRANSCRIBE_TIMEOUT``: seconds one transcribe batch may take (sizes the GPU worker's
    #: in-progress TTL, i.e. how fast a dead GPU worker's chunks are rerun).
    transcribe_timeout: float = 45.0
    #: ``VTP_CPU_TIMEOUT``: seconds one CPU stage may take.
    cpu_timeout: float = 3600.0
    #: ``VTP_RESULT_TTL``: seconds job records and artifacts are kept after a job ends.
    result_ttl: int = 7 * 24 * 3600
    #: ``VTP_RETRY_DELAY``: seconds before a stage's first retry after a transient error; doubles
    #: with every further try, capped at a minute.
    retry_delay: float = 2.0
    #: ``VTP_TEST_STAGE_DELAY``: TEST-ONLY. ``"extract:5,transcribe:3"`` makes the arq workers
    #: sleep that long inside those stages, so crash tests can kill a worker mid-stage without
    #: relying on timing luck. Never set it in production.
    test_stage_delay: str = ""
    #: ``VTP_IDLE_EXIT``: a worker exits (code 0) once its queue has been empty and nothing has
    #: run for this many seconds (0: never). On Fly this stops the machine when the queue drains.
    idle_exit: float = 0.0
    # -- the GPU worker's hardware: its settings, not the job's (workers/gpu_worker.py) ------
    #: ``VTP_ENGINE``: the speech engine of a ``vtp worker --queue gpu``: ``transformers``,
    #: ``ctranslate2``, or ``auto`` (transformers on a CUDA GPU, ctranslate2 otherwise).
    engine: str = "auto"
    #: ``VTP_DEVICE``: ``cuda``, ``cpu`` or ``auto`` (CUDA when there is a GPU).
    device: str = "auto"
    #: ``VTP_COMPUTE_TYPE``: ``auto`` (float16 on CUDA; int8 for ctranslate2 / float32 for
    #: transformers on CPU), or a compute type (``float16``, ``bfloat16``, ``int8_float16``, ...).
    compute_type: str = "auto"
    #: ``VTP_MODELS``: comma list of the models a GPU worker serves, all loaded at start before
    #: it takes work; the first is the default. A job naming another model fails at once.
    models: str = "tiny.en"
    #: ``VTP_GPU_JOBS``: transcribe jobs a GPU worker runs at once (arq ``max_jobs``); their
    #: chunks share the worker's decode batches (``workers/batcher.py``). 0: 4 on CUDA, 1 on CPU.
    gpu_jobs: int = 0
    #: ``VTP_DECODE_BATCH``: chunks the GPU worker decodes in one model call (across jobs);
    #: separate from ``VTP_BATCH_SIZE``, the chunks per transcribe job.
    decode_batch: int = 16
    #: ``VTP_BATCH_WAIT_MS``: how long the batcher waits for more chunks to fill a decode batch.
    batch_wait_ms: float = 30.0

    _ENV = {
        "redis_url": "REDIS_URL",
        "data_dir": "VTP_DATA_DIR",
        "storage_url": "VTP_STORAGE",
        "batch_size": "VTP_BATCH_SIZE",
        "ffmpeg_timeout": "VTP_FFMPEG_TIMEOUT",
        "max_input_mb": "VTP_MAX_INPUT_MB",
        "job_tries": "VTP_JOB_TRIES",
        "transcribe_timeout": "VTP_TRANSCRIBE_TIMEOUT",
        "cpu_timeout": "VTP_CPU_TIMEOUT",
        "result_ttl": "VTP_RESULT_TTL",
        "retry_delay": "VTP_RETRY_DELAY",
        "test_stage_delay": "VTP_TEST_STAGE_DELAY",
        "idle_exit": "VTP_IDLE_EXIT",
        "engine": "VTP_ENGINE",
        "device": "VTP_DEVICE",
        "compute_type": "VTP_COMPUTE_TYPE",
        "models": "VTP_MODELS",
        "gpu_jobs": "VTP_GPU_JOBS",
        "decode_batch": "VTP_DECODE_BATCH",
        "batch_wait_ms": "VTP_BATCH_WAIT_MS",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            var = cls._ENV.get(f.name)
            if var and env.get(var):
                raw = env[var]
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise errors.OptionsError(f"{var}={raw!r} is not a valid {type(f.default).__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.data_dir:
            object.__setattr__(settings, "data_dir", _default_data_dir())
        if not settings.storage_url:
            object.__setattr__(settings, "storage_url", Path(settings.data_dir).resolve().as_uri())
        return settings

    @property
    def model_list(self) -> list[str]:
        """``VTP_MODELS`` as a list, the default model first."""
        return [m.strip() for m in self.models.split(",") if m.strip()] or ["tiny.en"]

    @property
    def max_input_bytes(self) -> int | None:
        return self.max_input_mb * 1024 * 1024 if self.max_input_mb > 0 else None

    def stage_delay(self, stage: str) -> float:
        """TEST-ONLY: the extra seconds ``VTP_TEST_STAGE_DELAY`` puts into ``stage`` (0: none)."""
        for item in self.test_stage_delay.split(","):
            name, _, seconds = item.partition(":")
            if name.strip() == stage:
                try:
                    return float(seconds)
                except ValueError:
                    raise errors.OptionsError(f"VTP_TEST_STAGE_DELAY item {item!r} is not STAGE:SECONDS") from None
        return 0.0
