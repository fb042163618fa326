"""Settings, parsed once from the environment into one typed object.

Every process (CLI, workers, web) calls ``Settings.from_env()`` at start and passes the result
down; nothing else reads ``os.environ``. Unset variables take the defaults below, which are
the right ones for a single host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar
from pathlib import Path

from app import errors


def default_cache_dir() -> str:
    """Where converted models are cached (``$XDG_CACHE_HOME/vtp``, else ``~/.cache/vtp``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "vtp")


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "vtp")


def env(var: str, default: Any, section: str, *, secret: bool = False) -> Any:
    """A setting read from ``var``: its default, its section, and whether it is a credential
    (it reaches a process only through the platform's secret store, never a machine config)."""
    return field(default=default, metadata={"env": var, "section": section, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting, in sections; each field names its variable once (``env(VAR, default, section)``).

    Fields stay flat (``settings.lease``), the section is each field's metadata: the worker
    environment the controller forwards is derived from it (``WORKER_SECTIONS``), and no secret
    (``secret=True``) is ever forwarded.
    """

    # -- queue: the job queue (Redis); the stages' tries, deadlines and leases --------------------
    #: the queue and the job records.
    redis_url: str = env("REDIS_URL", "redis://localhost:6379/0", "queue", secret=True)
    #: attempts per stage job before the job is failed.
    job_tries: int = env("VTP_JOB_TRIES", 4, "queue")
    #: seconds one transcribe batch may take (sizes the GPU worker's
    #: in-progress TTL, i.e. how fast a dead GPU worker's chunks are rerun).
    transcribe_timeout: float = env("VTP_TRANSCRIBE_TIMEOUT", 45.0, "queue")
    #: seconds one CPU stage may take.
    cpu_timeout: float = env("VTP_CPU_TIMEOUT", 3600.0, "queue")
    #: seconds job records and artifacts are kept after a job ends.
    result_ttl: int = env("VTP_RESULT_TTL", 7 * 24 * 3600, "queue")
    #: seconds before a stage's first retry after a transient error; doubles
    #: with every further try, capped at a minute.
    retry_delay: float = env("VTP_RETRY_DELAY", 2.0, "queue")
    #: seconds a worker's claim on a running stage lasts unless renewed. A live
    #: worker renews it every third of that for the stages it runs, so a dead worker's stage is
    #: rerun by another within this (plus a poll), however long the stage itself may take.
    lease: float = env("VTP_LEASE", 60.0, "queue")
    #: seconds between the CPU workers' sweeps for stuck jobs (one sweeper
    #: at a time across workers); a job with no stage queued or running that has not changed for
    #: this long is re-driven or failed, and ended jobs' artifacts older than ``result_ttl`` go.
    sweep_interval: float = env("VTP_SWEEP_INTERVAL", 30.0, "queue")
    #: TEST-ONLY. ``"extract:5,transcribe:3"`` makes the arq workers
    #: sleep that long inside those stages, so crash tests can kill a worker mid-stage without
    #: relying on timing luck. Never set it in production.
    test_stage_delay: str = env("VTP_TEST_STAGE_DELAY", "", "queue")

    # -- storage: where artifacts live ------------------------------------------------------------
    #: ``file:///dir`` or ``s3://bucket/prefix``; defaults to ``data_dir``.
    storage_url: str = env("VTP_STORAGE", "", "storage")

    # -- host: this host's own directories --------------------------------------------------------
    #: artifacts of the local-directory storage backend.
    data_dir: str = env("VTP_DATA_DIR", "", "host")

    # -- media: what an input may be, and the fan-out unit ----------------------------------------
    #: chunks per transcribe job (the fan-out unit).
    batch_size: int = env("VTP_BATCH_SIZE", 8, "media")
    #: seconds ffmpeg may take on one input before it is declared broken.
    ffmpeg_timeout: float = env("VTP_FFMPEG_TIMEOUT", 3600.0, "media")
    #: inputs larger than this are refused (0: no limit).
    max_input_mb: int = env("VTP_MAX_INPUT_MB", 0, "media")
    #: seconds of audio an input may hold (0: no limit); checked against the
    #: container's declared duration before extraction and on what is decoded during it.
    max_duration: float = env("VTP_MAX_DURATION", 21600.0, "media")

    # -- gpu: the GPU worker's hardware and models, not the job's (workers/gpu_worker.py) ---------
    #: comma list of the models a client may ask for and the GPU workers serve
    #: (each loaded at start); the first is the default.
    models: str = env("VTP_MODELS", "tiny.en", "gpu")
    #: the speech engine of a ``vtp worker --queue gpu``: ``transformers``,
    #: ``ctranslate2``, or ``auto`` (transformers on a CUDA GPU, ctranslate2 otherwise).
    engine: str = env("VTP_ENGINE", "auto", "gpu")
    #: ``cuda``, ``cpu`` or ``auto`` (CUDA when there is a GPU).
    device: str = env("VTP_DEVICE", "auto", "gpu")
    #: ``auto`` (float16 on CUDA; int8 for ctranslate2 / float32 for
    #: transformers on CPU), or a compute type (``float16``, ``bfloat16``, ``int8_float16``, ...).
    compute_type: str = env("VTP_COMPUTE_TYPE", "auto", "gpu")
    #: transcribe jobs a GPU worker runs at once (arq ``max_jobs``); their
    #: chunks share the worker's decode batches (``workers/batcher.py``). 0: 4 on CUDA, 1 on CPU.
    gpu_jobs: int = env("VTP_GPU_JOBS", 0, "gpu")
    #: chunks the GPU worker decodes in one model call (across jobs);
    #: separate from ``VTP_BATCH_SIZE``, the chunks per transcribe job. 0: 32 on CUDA (4 jobs x
    #: 8 chunks fill it; large-v3 at beam 5 peaks at 44 GB, docs/benchmarks.md), 16 on CPU.
    #: A ceiling: a call that runs out of GPU memory is halved and the size that fitted kept.
    decode_batch: int = env("VTP_DECODE_BATCH", 0, "gpu")
    #: how long the batcher waits for more chunks to fill a decode batch.
    batch_wait_ms: float = env("VTP_BATCH_WAIT_MS", 30.0, "gpu")

    # -- client: `vtp submit --wait` --------------------------------------------------------------
    #: seconds ``vtp submit --wait`` waits on a job that shows no progress
    #: (no state change, no live stage) before it reports the job as stopped.
    stall_timeout: float = env("VTP_STALL_TIMEOUT", 900.0, "client")

    # -- web: the web process ---------------------------------------------------------------------
    #: comma list of bearer tokens of the web API; each owns its jobs. None:
    #: the web process serves loopback only (or a public address with ``--insecure``).
    api_tokens: str = env("VTP_API_TOKENS", "", "web", secret=True)
    #: larger uploads (and URL downloads) are cut off with 413.
    max_upload_mb: int = env("VTP_MAX_UPLOAD_MB", 1024, "web")
    #: the web process's port (what Fly and most hosts set).
    port: int = env("PORT", 8000, "web")
    #: comma list of CIDRs that URL ingest and webhooks may reach
    #: although they are loopback, private or link-local (refused otherwise).
    private_allowlist: str = env("VTP_PRIVATE_ALLOWLIST", "", "web")

    # -- webhooks: webhook signing and delivery (run by the CPU workers) --------------------------
    #: ``whsec_<base64>`` key signing webhooks (Standard Webhooks); jobs
    #: may ask for a webhook only when it is set.
    webhook_secret: str = env("VTP_WEBHOOK_SECRET", "", "webhooks", secret=True)
    #: delivery attempts per webhook before it is given up.
    webhook_tries: int = env("VTP_WEBHOOK_TRIES", 8, "webhooks")
    #: seconds before the second attempt; doubles (with jitter) after.
    webhook_retry_delay: float = env("VTP_WEBHOOK_RETRY_DELAY", 5.0, "webhooks")

    # -- fleet: the fleet controller (`vtp controller`, workers/controller/) and its machines -----
    #: a worker exits (code 0) once its queue has been empty and nothing has
    #: run for this many seconds (0: never). On Fly this stops the machine when the queue drains.
    idle_exit: float = env("VTP_IDLE_EXIT", 0.0, "fleet")
    #: worker machines the controller runs at most.
    max_machines: int = env("VTP_MAX_MACHINES", 4, "fleet")
    #: seconds in which the controller aims to drain the queued audio.
    drain_target: float = env("VTP_DRAIN_TARGET", 600.0, "fleet")
    #: audio seconds one machine transcribes per wall second (measure it).
    machine_throughput: float = env("VTP_MACHINE_THROUGHPUT", 30.0, "fleet")
    #: stopped machines kept for fast starts; surplus ones are destroyed.
    warm_pool: int = env("VTP_WARM_POOL", 2, "fleet")
    #: seconds a surplus stopped machine is kept before it is destroyed.
    stopped_grace: float = env("VTP_STOPPED_GRACE", 600.0, "fleet")
    #: seconds a machine may be up without its worker ever having been seen
    #: alive before it counts as broken: scheduling, a GPU node scale-up, the image pull and the
    #: model load (the Kubernetes startup probe of the worker Jobs is sized from it).
    boot_grace: float = env("VTP_BOOT_GRACE", 900.0, "fleet")
    #: seconds a machine whose worker *was* seen alive may go without a live
    #: health key before it counts as broken (a Redis restart, a blip, a slow poll cost nothing).
    #: A machine whose worker still holds a stage's lease is never destroyed, whatever this says.
    lost_grace: float = env("VTP_LOST_GRACE", 60.0, "fleet")
    #: seconds between two looks at the queue.
    controller_interval: float = env("VTP_CONTROLLER_INTERVAL", 5.0, "fleet")
    #: the image worker machines run (default ``FLY_IMAGE_REF``: this app's).
    worker_image: str = env("VTP_WORKER_IMAGE", "", "fleet")
    #: set by Fly inside its machines (the image of the running release).
    fly_image_ref: str = env("FLY_IMAGE_REF", "", "fleet")
    #: the Machines API (``http://_api.internal:4280`` from inside Fly).
    fly_api_hostname: str = env("FLY_API_HOSTNAME", "https://api.machines.dev", "fleet")
    #: a token that may manage the app's machines (``fly tokens deploy``).
    fly_api_token: str = env("FLY_API_TOKEN", "", "fleet", secret=True)
    #: the app the worker machines belong to (set by Fly inside its machines).
    fly_app_name: str = env("FLY_APP_NAME", "", "fleet")
    #: comma list of regions to try in order (empty: Fly picks).
    fly_regions: str = env("VTP_FLY_REGIONS", "", "fleet")
    #: comma list of machine kinds to try in order: a GPU (``a100-40gb``,
    #: ``a100-80gb``, ``l40s``) or a CPU size (``performance-8x``, ``shared-cpu-4x``...).
    fly_guests: str = env("VTP_FLY_GUESTS", "performance-8x", "fleet")
    #: where the controller creates worker Jobs (default: its own namespace).
    k8s_namespace: str = env("VTP_K8S_NAMESPACE", "", "fleet")
    #: ``nvidia.com/gpu`` requested per worker Job (0: a CPU worker).
    k8s_gpus: int = env("VTP_K8S_GPUS", 1, "fleet")
    #: ``ttlSecondsAfterFinished`` of the worker Jobs.
    k8s_job_ttl: int = env("VTP_K8S_JOB_TTL", 300, "fleet")

    # -- costs: cost accounting (app/costs.py) ----------------------------------------------------
    #: what this worker runs on (a Fly guest kind or size, or any name);
    #: the controller sets it on the machines it starts.
    machine_kind: str = env("VTP_MACHINE_KIND", "", "costs")
    #: $ per hour of this worker's machine (0: the list price of
    #: ``machine_kind`` from ``app.costs.PRICES``, or nothing recorded for an unknown kind).
    machine_price_hour: float = env("VTP_MACHINE_PRICE_HOUR", 0.0, "costs")

    #: The sections a worker machine the controller starts reads: what ``worker_env`` forwards
    #: (the fleet, web, webhook, cost and client settings stay where they are read; the
    #: controller sets the machine's kind, price and ``--idle-exit`` itself). Never a secret.
    WORKER_SECTIONS: ClassVar[frozenset[str]] = frozenset({"queue", "storage", "media", "gpu"})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            var = f.metadata["env"]
            if env.get(var):
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
        every setting of the sections a worker reads (``WORKER_SECTIONS``) that differs from its default.
        No secret: ``REDIS_URL``, the S3 credentials, ``VTP_WEBHOOK_SECRET`` and the tokens come
        from the platform's secret store (Fly app secrets; the Kubernetes Secret ``vtp-secrets``)."""
        env = {"VTP_STORAGE": self.storage_url}
        for f in fields(self):
            var = f.metadata["env"]
            value = getattr(self, f.name)
            if f.name in self.for_workers() and var not in env and value != f.default:
                env[var] = str(value)
        return env

    @classmethod
    def env_var(cls, name: str) -> str:
        """The variable a setting is read from."""
        return next(f.metadata["env"] for f in fields(cls) if f.name == name)

    @classmethod
    def section(cls, section: str) -> tuple[str, ...]:
        """The settings of one section."""
        return tuple(f.name for f in fields(cls) if f.metadata["section"] == section)

    @classmethod
    def secrets(cls) -> frozenset[str]:
        """Settings that hold credentials: they reach a process only through the platform's
        secret store (Fly app secrets, which every machine of the app gets; a Kubernetes Secret
        named by reference), never through a machine config or a Job body that the API shows to
        whoever may read it. ``REDIS_URL`` is one: it usually carries the Redis password."""
        return frozenset(f.name for f in fields(cls) if f.metadata["secret"])

    @classmethod
    def for_workers(cls) -> frozenset[str]:
        """What ``worker_env`` forwards: the settings of ``WORKER_SECTIONS``, never a secret."""
        return frozenset(
            f.name for f in fields(cls) if f.metadata["section"] in cls.WORKER_SECTIONS and not f.metadata["secret"]
        )

    def secret_values(self) -> list[str]:
        """The values of the secret settings that are set (for tests and log scrubbing)."""
        return [v for name in sorted(self.secrets()) if (v := str(getattr(self, name)))]

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
