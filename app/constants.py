"""Every Redis key prefix and queue name vtp uses, in one place (as arq keeps its own in
``arq/constants.py``).

vtp's keys all start with ``vtp:``; arq's own keys (``arq:job:<id>``, ``arq:in-progress:<id>``,
``arq:retry:<id>``, ``arq:result:<id>``) sit beside them in the same database. The arq job ids
vtp enqueues are deterministic, ``<job id>:<stage>`` (``<job id>:transcribe:<batch>`` for the
fan-out), so enqueueing a stage twice is a no-op while the first is queued, running or its
result is kept.
"""

from __future__ import annotations

#: arq queues (sorted sets): CPU stages, and the GPU stage alone (see workers/runtime/).
QUEUE_CPU = "vtp:cpu"
QUEUE_GPU = "vtp:gpu"
QUEUES = {"cpu": QUEUE_CPU, "gpu": QUEUE_GPU}

#: ``vtp:job:<id>``: the job record (``messages.JobRecord``, msgpack).
JOB_PREFIX = "vtp:job:"
#: ``vtp:jobs``: sorted set of every job id, scored by creation time (listing, the web page).
JOBS_INDEX = "vtp:jobs"
#: ``vtp:owner:<owner>``: sorted set of one owner's job ids, scored by creation time (``GET /v1/jobs``).
OWNER_JOBS_PREFIX = "vtp:owner:"
#: ``vtp:events:<id>``: stream of ``messages.ProgressEvent`` (msgpack in field ``e``).
EVENTS_PREFIX = "vtp:events:"
#: ``vtp:idem:<owner>:<key>``: job id created with that idempotency key.
IDEMPOTENCY_PREFIX = "vtp:idem:"
#: ``vtp:sha:<owner>:<media sha256>:<options digest>``: a ``done`` job with these media and options.
SHA_PREFIX = "vtp:sha:"
#: ``vtp:dag:<id>:<part>``: a running job's scratch state between stages:
#:   audio (ExtractedAudio), segmentation (Segmentation), pending (batches left, counter),
#:   finished (set of batch indexes), parts (hash batch index -> BatchTranscript),
#:   done (hash: chunks / audio seconds transcribed), runs (hash stage -> completed runs).
DAG_PREFIX = "vtp:dag:"
#: ``vtp:health:<queue>:<worker name>``: set by a live worker every few seconds (``vtp worker --check``).
HEALTH_PREFIX = "vtp:health:"
#: ``vtp:gpustats:<worker name>``: hash of a GPU worker's batching counters since it started
#: (batches, chunks, slots, fill_ratio = chunks / slots, last_batch, shared_batches, kept_apart,
#: busy_seconds, decode_batch, models, engine, device); refreshed with its health key, expires
#: half a minute after the worker is gone. Read by ``/metrics``.
GPU_STATS_PREFIX = "vtp:gpustats:"

#: ``vtp:stats``: hash of the counters ``/metrics`` shows, moved by ``JobStore`` in the same
#: MULTI as each state change: ``state:<state>`` (jobs in each state now; for done, failed and
#: cancelled, jobs that ever ended so), ``audio_seconds`` (media of done jobs),
#: ``stage_seconds:<stage>`` and ``stage_count:<stage>`` (time done jobs spent in each stage).
STATS_KEY = "vtp:stats"

#: ``vtp:active``: sorted set of the jobs that have not ended, scored by creation time (what the
#: sweeper looks at; a job leaves it when it ends).
ACTIVE_INDEX = "vtp:active"
#: ``vtp:ended``: sorted set of ended jobs scored by when they ended, kept beyond their records:
#: the sweeper deletes their storage artifacts ``VTP_RESULT_TTL`` after that.
ENDED_INDEX = "vtp:ended"
#: ``vtp:beat:<id>``: set (to the Unix time) by the worker running one of the job's stages, renewed
#: with its lease: the job is being worked on (``vtp submit --wait`` tells slow from stopped).
BEAT_PREFIX = "vtp:beat:"
#: ``vtp:holds:<queue>:<worker name>``: the arq ids of the stage jobs a worker runs (comma list),
#: set and renewed with their leases (TTL ``VTP_LEASE``), deleted when it runs none: the fleet
#: controller never destroys a machine whose worker holds one, health key or not.
HOLDS_PREFIX = "vtp:holds:"
#: ``vtp:webhooks:due``: set of ended jobs whose webhook is still to be queued. Added in the same
#: MULTI that ends a job with a ``webhook_url`` (whoever ends it: a stage, the sweeper, a cancel),
#: emptied by the sweeper's pass, which queues each one: every end notifies.
WEBHOOKS_DUE = "vtp:webhooks:due"
#: ``vtp:sweep:lock``: held by the one worker sweeping right now (SET NX PX, token-checked release).
SWEEP_LOCK = "vtp:sweep:lock"

#: Names of the arq functions (what ``enqueue_job`` names and the workers register).
FN_EXTRACT = "extract"
FN_SEGMENT = "segment"
FN_TRANSCRIBE = "transcribe"
FN_MERGE = "merge"
FN_RENDER = "render"
FN_NOTIFY = "notify"
FN_WEBHOOK = "webhook"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def owner_jobs_key(owner: str) -> str:
    return OWNER_JOBS_PREFIX + owner


def events_key(job_id: str) -> str:
    return EVENTS_PREFIX + job_id


def dag_key(job_id: str, part: str) -> str:
    return f"{DAG_PREFIX}{job_id}:{part}"


def beat_key(job_id: str) -> str:
    return BEAT_PREFIX + job_id


def health_key(queue: str, name: str) -> str:
    return f"{HEALTH_PREFIX}{queue}:{name}"


def holds_key(queue: str, name: str) -> str:
    return f"{HOLDS_PREFIX}{queue}:{name}"


def gpu_stats_key(name: str) -> str:
    return GPU_STATS_PREFIX + name


def arq_job_id(job_id: str, stage: str, index: int | None = None) -> str:
    """The deterministic arq job id of one stage of one job."""
    return f"{job_id}:{stage}" if index is None else f"{job_id}:{stage}:{index}"


#: arq's own key prefixes (``arq.constants``), for readers that do not import arq (the fleet
#: controller): the pickled job, and the marker a worker sets while it runs the job.
ARQ_JOB_PREFIX = "arq:job:"
ARQ_IN_PROGRESS_PREFIX = "arq:in-progress:"
