"""Submitting media as a distributed job: check, hash, deduplicate, upload, record, enqueue.

Used by ``vtp submit`` (and meant for the web process): it talks to Redis and the artifact
storage directly, no server in between. The first stage is enqueued through the ``enqueue``
callable (``workers.runtime.enqueue.enqueue_first_stage``), so this module never imports arq.

Deduplication, in this order:

* the same ``idempotency_key`` (per owner) returns the job first created with it, whatever
  its state: a client may retry a submit safely;
* the same media bytes (sha256) with the same options, when a job of the same owner is
  queued, running or ``done``, returns *that* job (its id, record and outputs) instead of
  creating one: nothing is uploaded again or recomputed, and a client that retries a request
  (the OpenAI SDK does, twice, after its timeout) joins the job its first try started. Checked
  again atomically when the record is created, so two identical submits at once make one job.
  A failed or cancelled job is not joined: the same media then makes a new job. Scoped per
  owner so that one user's submission never reveals another's transcript.

The media is stored under the new job's id before its record is created. If storing it or
creating the record fails (Redis unreachable: 503 in the web process), the stored media is
deleted before the error is raised, so no upload is left that no record names. Once the
record exists its artifacts go with it (deleted with the job, or expired by the sweeper
``VTP_RESULT_TTL`` after it ends).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from app import dag, errors
from app.jobs import JobStore
from app.messages import JobRecord, TranscribeOptions
from app import keys
from app.media import check_media_file
from app.storage import Storage

Enqueue = Callable[[JobRecord], Awaitable[None]]
log = logging.getLogger("vtp.submit")


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    #: new job; the job of the same idempotency key; a done job with the same media and options;
    #: or a queued or running job with the same media and options.
    how: Literal["new", "idempotent", "reused", "joined"]


def _how(record: JobRecord) -> Literal["reused", "joined"]:
    return "reused" if record.state == dag.DONE else "joined"


async def _discard(storage: Storage, job_id: str) -> None:
    """Delete what was stored for a job that never got a record (never raises)."""
    try:
        with anyio.CancelScope(shield=True):
            await storage.delete_prefix(keys.job_prefix(job_id))
    except Exception as exc:  # storage down too: say what is left where
        log.warning("could not delete %s after a failed submit: %s", keys.job_prefix(job_id), exc)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def submit_file(
    store: JobStore,
    storage: Storage,
    enqueue: Enqueue,
    path: Path,
    options: TranscribeOptions,
    *,
    basename: str,
    owner: str = "",
    idempotency_key: str = "",
    max_bytes: int | None = None,
    max_duration: float = 0.0,
    reuse: bool = True,
    input_name: str = "",
    webhook_url: str = "",
    sha256: str = "",
) -> Submitted:
    # missing, empty, too large; with a duration limit also not media, no audio, or declaring
    # more than the limit: no job at all (the web process checks its uploads the same way first)
    await check_media_file(path, max_bytes=max_bytes, max_duration=max_duration)
    if idempotency_key:
        earlier = await store.find_by_key(owner, idempotency_key)
        if earlier is not None:
            return Submitted(earlier, "idempotent")
    # The web process hashes uploads while they stream in: no second read of the file.
    sha = sha256 or await anyio.to_thread.run_sync(sha256_of, path)
    if reuse:
        earlier = await store.find_reusable(owner, sha, options)
        if earlier is not None:
            return Submitted(earlier, _how(earlier))

    job_id = uuid.uuid4().hex
    try:
        await storage.put_file(keys.media_key(job_id), path)
        record, created = await store.create(
            JobRecord(
                id=job_id,
                owner=owner,
                input_name=input_name or path.name,
                basename=basename,
                media_key=keys.media_key(job_id),
                sha256=sha,
                idempotency_key=idempotency_key,
                options=options,
                webhook_url=webhook_url,
            ),
            join=reuse,
        )
    except BaseException:  # no record names the media: nothing would ever find it again
        await _discard(storage, job_id)
        raise
    if not created:  # lost a race for the idempotency key or the same media: drop our upload, report the winner
        await _discard(storage, job_id)
        same_key = bool(idempotency_key) and record.idempotency_key == idempotency_key
        return Submitted(record, "idempotent" if same_key else _how(record))
    try:
        await enqueue(record)
    except errors.VtpError as exc:
        await store.fail(job_id, f"could not be queued: {exc}")
        raise
    return Submitted(record, "new")
