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
    #: ``VTP_MAX_DURATION``: seconds of audio an input may hold (0: no limit); checked against the
    #: container's declared duration before extraction and on what is decoded during it.
    max_duration: float = 21600.0
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
    #: ``VTP_MODELS``: comma list of the models a client may ask for and the GPU workers serve
    #: (each loaded at start); the first is the default.
    models: str = "tiny.en"
    #: ``VTP_API_TOKENS``: comma list of bearer tokens of the web API; each owns its jobs. None:
    #: the web process serves loopback only (or a public address with ``--insecure``).
    api_tokens: str = ""
    #: ``VTP_MAX_UPLOAD_MB``: larger uploads (and URL downloads) are cut off with 413.
    max_upload_mb: int = 1024
    #: ``PORT``: the web process's port (what Fly and most hosts set).
    port: int = 8000
    #: ``VTP_WEBHOOK_SECRET``: ``whsec_<base64>`` key signing webhooks (Standard Webhooks); jobs
    #: may ask for a webhook only when it is set.
    webhook_secret: str = ""
    #: ``VTP_WEBHOOK_TRIES``: delivery attempts per webhook before it is given up.
    webhook_tries: int = 8
    #: ``VTP_WEBHOOK_RETRY_DELAY``: seconds before the second attempt; doubles (with jitter) after.
    webhook_retry_delay: float = 5.0
    #: ``VTP_PRIVATE_ALLOWLIST``: comma list of CIDRs that URL ingest and webhooks may reach
    #: although they are loopback, private or link-local (refused otherwise).
    private_allowlist: str = ""
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
    # ``VTP_MODELS`` (``models`` above) is also the GPU worker's allow-list: it loads every one
    # at start, before it takes work; a job naming another model fails at once.
    #: ``VTP_GPU_JOBS``: transcribe jobs a GPU worker runs at once (arq ``max_jobs``); their
    #: chunks share the worker's decode batches (``workers/batcher.py``). 0: 4 on CUDA, 1 on CPU.
    gpu_jobs: int = 0
    #: ``VTP_DECODE_BATCH``: chunks the GPU worker decodes in one model call (across jobs);
    #: separate from ``VTP_BATCH_SIZE``, the chunks per transcribe job. 0: 32 on CUDA (4 jobs x
    #: 8 chunks fill it; large-v3 at beam 5 peaks at 44 GB, docs/benchmarks.md), 16 on CPU.
    #: A ceiling: a call that runs out of GPU memory is halved and the size that fitted kept.
    decode_batch: int = 0
    #: ``VTP_BATCH_WAIT_MS``: how long the batcher waits for more chunks to fill a decode batch.
    batch_wait_ms: float = 30.0

    # -- the fleet controller (`vtp controller`, workers/controller/) and cost accounting --
    #: ``VTP_MAX_MACHINES``: worker machines the controller runs at most.
    max_machines: int = 4
    #: ``VTP_DRAIN_TARGET``: seconds in which the controller aims to drain the queued audio.
    drain_target: float = 600.0
    #: ``VTP_MACHINE_THROUGHPUT``: audio seconds one machine transcribes per wall second (measure it).
    machine_throughput: float = 30.0
    #: ``VTP_WARM_POOL``: stopped machines kept for fast starts; surplus ones are destroyed.
    warm_pool: int = 2
    #: ``VTP_STOPPED_GRACE``: seconds a surplus stopped machine is kept before it is destroyed.
    stopped_grace: float = 600.0
    #: ``VTP_BOOT_GRACE``: seconds a machine may be up without its worker ever having been seen
    #: alive before it counts as broken: scheduling, a GPU node scale-up, the image pull and the
    #: model load (the Kubernetes startup probe of the worker Jobs is sized from it).
    boot_grace: float = 900.0
    #: ``VTP_LOST_GRACE``: seconds a machine whose worker *was* seen alive may go without a live
    #: health key before it counts as broken (a Redis restart, a blip, a slow poll cost nothing).
    #: A machine whose worker still holds a stage's lease is never destroyed, whatever this says.
    lost_grace: float = 60.0
    #: ``VTP_CONTROLLER_INTERVAL``: seconds between two looks at the queue.
    controller_interval: float = 5.0
    #: ``VTP_WORKER_IMAGE``: the image worker machines run (default ``FLY_IMAGE_REF``: this app's).
    worker_image: str = ""
    #: ``FLY_IMAGE_REF``: set by Fly inside its machines (the image of the running release).
    fly_image_ref: str = ""
    #: ``FLY_API_HOSTNAME``: the Machines API (``http://_api.internal:4280`` from inside Fly).
    fly_api_hostname: str = "https://api.machines.dev"
    #: ``FLY_API_TOKEN``: a token that may manage the app's machines (``fly tokens deploy``).
    fly_api_token: str = ""
    #: ``FLY_APP_NAME``: the app the worker machines belong to (set by Fly inside its machines).
    fly_app_name: str = ""
    #: ``VTP_FLY_REGIONS``: comma list of regions to try in order (empty: Fly picks).
    fly_regions: str = ""
    #: ``VTP_FLY_GUESTS``: comma list of machine kinds to try in order: a GPU (``a100-40gb``,
    #: ``a100-80gb``, ``l40s``) or a CPU size (``performance-8x``, ``shared-cpu-4x``...).
    fly_guests: str = "performance-8x"
    #: ``VTP_K8S_NAMESPACE``: where the controller creates worker Jobs (default: its own namespace).
    k8s_namespace: str = ""
    #: ``VTP_K8S_GPUS``: ``nvidia.com/gpu`` requested per worker Job (0: a CPU worker).
    k8s_gpus: int = 1
    #: ``VTP_K8S_JOB_TTL``: ``ttlSecondsAfterFinished`` of the worker Jobs.
    k8s_job_ttl: int = 300
    #: ``VTP_MACHINE_KIND``: what this worker runs on (a Fly guest kind or size, or any name);
    #: the controller sets it on the machines it starts.
    machine_kind: str = ""
    #: ``VTP_MACHINE_PRICE_HOUR``: $ per hour of this worker's machine (0: the list price of
    #: ``machine_kind`` from ``app.costs.PRICES``, or nothing recorded for an unknown kind).
    machine_price_hour: float = 0.0

    _ENV = {
        "redis_url": "REDIS_URL",
        "data_dir": "VTP_DATA_DIR",
        "storage_url": "VTP_STORAGE",
        "batch_size": "VTP_BATCH_SIZE",
        "ffmpeg_timeout": "VTP_FFMPEG_TIMEOUT",
        "max_input_mb": "VTP_MAX_INPUT_MB",
        "max_duration": "VTP_MAX_DURATION",
        "job_tries": "VTP_JOB_TRIES",
        "transcribe_timeout": "VTP_TRANSCRIBE_TIMEOUT",
        "cpu_timeout": "VTP_CPU_TIMEOUT",
        "result_ttl": "VTP_RESULT_TTL",
        "retry_delay": "VTP_RETRY_DELAY",
        "lease": "VTP_LEASE",
        "sweep_interval": "VTP_SWEEP_INTERVAL",
        "stall_timeout": "VTP_STALL_TIMEOUT",
        "test_stage_delay": "VTP_TEST_STAGE_DELAY",
        "models": "VTP_MODELS",
        "api_tokens": "VTP_API_TOKENS",
        "max_upload_mb": "VTP_MAX_UPLOAD_MB",
        "port": "PORT",
        "webhook_secret": "VTP_WEBHOOK_SECRET",
        "webhook_tries": "VTP_WEBHOOK_TRIES",
        "webhook_retry_delay": "VTP_WEBHOOK_RETRY_DELAY",
        "private_allowlist": "VTP_PRIVATE_ALLOWLIST",
        "idle_exit": "VTP_IDLE_EXIT",
        "engine": "VTP_ENGINE",
        "device": "VTP_DEVICE",
        "compute_type": "VTP_COMPUTE_TYPE",
        "gpu_jobs": "VTP_GPU_JOBS",
        "decode_batch": "VTP_DECODE_BATCH",
        "batch_wait_ms": "VTP_BATCH_WAIT_MS",
        "max_machines": "VTP_MAX_MACHINES",
        "drain_target": "VTP_DRAIN_TARGET",
        "machine_throughput": "VTP_MACHINE_THROUGHPUT",
        "warm_pool": "VTP_WARM_POOL",
        "stopped_grace": "VTP_STOPPED_GRACE",
        "boot_grace": "VTP_BOOT_GRACE",
        "lost_grace": "VTP_LOST_GRACE",
        "controller_interval": "VTP_CONTROLLER_INTERVAL",
        "worker_image": "VTP_WORKER_IMAGE",
        "fly_image_ref": "FLY_IMAGE_REF",
        "fly_api_hostname": "FLY_API_HOSTNAME",
        "fly_api_token": "FLY_API_TOKEN",
        "fly_app_name": "FLY_APP_NAME",
        "fly_regions": "VTP_FLY_REGIONS",
        "fly_guests": "VTP_FLY_GUESTS",
        "k8s_namespace": "VTP_K8S_NAMESPACE",
        "k8s_gpus": "VTP_K8S_GPUS",
        "k8s_job_ttl": "VTP_K8S_JOB_TTL",
        "machine_kind": "VTP_MACHINE_KIND",
        "machine_price_hour": "VTP_MACHINE_PRICE_HOUR",
    }
    #: What a worker machine the controller starts is told in its env (``worker_env``): an
    #: allow-list of the settings a worker reads, so a setting added later stays on the controller
    #: until someone decides a worker needs it. Never a secret (``SECRETS``), nor the web
    #: process's or the controller's own settings.
    _FOR_WORKERS = frozenset(
        {
            "storage_url", "batch_size", "ffmpeg_timeout", "max_input_mb", "max_duration", "job_tries",
            "transcribe_timeout", "cpu_timeout", "result_ttl", "retry_delay", "lease", "sweep_interval",
            "test_stage_delay", "models", "engine", "device", "compute_type", "gpu_jobs", "decode_batch",
            "batch_wait_ms",
        }
    )
    #: Settings that hold credentials: they reach a process only through the platform's secret
    #: store (Fly app secrets, which every machine of the app gets; a Kubernetes Secret named by
    #: reference), never through a machine config or a Job body that the API shows to whoever
    #: may read it. ``REDIS_URL`` is one: it usually carries the Redis password.
    SECRETS = frozenset({"redis_url", "api_tokens", "webhook_secret", "fly_api_token"})

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

    def worker_env(self) -> dict[str, str]:
        """The environment a worker machine the controller starts is given: ``VTP_STORAGE`` and
        every allow-listed pipeline setting (``_FOR_WORKERS``) that differs from its default.
        No secret: ``REDIS_URL``, the S3 credentials, ``VTP_WEBHOOK_SECRET`` and the tokens come
        from the platform's secret store (Fly app secrets; the Kubernetes Secret ``vtp-secrets``)."""
        env = {"VTP_STORAGE": self.storage_url}
        for f in fields(self):
            var = self._ENV.get(f.name)
            value = getattr(self, f.name)
            if var and f.name in self._FOR_WORKERS and var not in env and value != f.default:
                env[var] = str(value)
        return env

    def secret_values(self) -> list[str]:
        """The values of the secret settings that are set (for tests and log scrubbing)."""
        return [v for name in sorted(self.SECRETS) if (v := str(getattr(self, name)))]

    @property
    def fleet_idle_exit(self) -> float:
        """The ``--idle-exit`` of the machines the controller starts: they always stop when idle."""
        return self.idle_exit if self.idle_exit > 0 else 60.0

    @property
    def image(self) -> str:
        """The worker machines' image: ``VTP_WORKER_IMAGE``, else this Fly release's own."""
        return self.worker_image or self.fly_image_ref

    @property
    def max_input_bytes(self) -> int | None:
        return self.max_input_mb * 1024 * 1024 if self.max_input_mb > 0 else None

    @property
    def max_duration_seconds(self) -> float | None:
        return self.max_duration if self.max_duration > 0 else None

    @property
    def model_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.models.split(",") if m.strip()) or ("tiny.en",)

    @property
    def token_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.api_tokens.split(",") if t.strip())

    @property
    def max_upload_bytes(self) -> int | None:
        return self.max_upload_mb * 1024 * 1024 if self.max_upload_mb > 0 else None

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
