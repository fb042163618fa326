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
    #: ``VTP_LEASE``: seconds a worker's claim on a running stage lasts unless renewed. A live
    #: worker renews it every third of that for the stages it runs, so a dead worker's stage is
    #: rerun by another within this (plus a poll), however long the stage itself may take.
    lease: float = 60.0
    #: ``VTP_SWEEP_INTERVAL``: seconds between the CPU workers' sweeps for stuck jobs (one sweeper
    #: at a time across workers); a job with no stage queued or running that has not changed for
    #: this long is re-driven or failed, and ended jobs' artifacts older than ``result_ttl`` go.
    sweep_interval: float = 30.0
    #: ``VTP_STALL_TIMEOUT``: seconds ``vtp submit --wait`` waits on a job that shows no progress
    #: (no state change, no live stage) before it reports the job as stopped.
    stall_timeout: float = 900.0
    #: ``VTP_TEST_STAGE_DELAY``: TEST-ONLY. ``"extract:5,transcribe:3"`` makes the arq workers
    #: sleep that long inside those stages, so crash tests can kill a worker mid-stage without
    #: relying on timing luck. Never set it in production.
    test_stage_delay: str = ""

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
        "lease": "VTP_LEASE",
        "sweep_interval": "VTP_SWEEP_INTERVAL",
        "stall_timeout": "VTP_STALL_TIMEOUT",
        "test_stage_delay": "VTP_TEST_STAGE_DELAY",
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
