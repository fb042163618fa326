"""Submitting media as a distributed job: check, hash, deduplicate, upload, record, enqueue.

Used by ``vtp submit`` (and meant for the web process): it talks to Redis and the artifact
storage directly, no server in between. The first stage is enqueued through the ``enqueue``
callable (``workers.arq_runner.enqueue_first_stage``), so this module never imports arq.

Deduplication, in this order:

* the same ``idempotency_key`` (per owner) returns the job first created with it, whatever
  its state: a client may retry a submit safely;
* the same media bytes (sha256) with the same options, when a job of the same owner already
  finished ``done``, returns *that* job (its id, record and outputs) instead of creating one:
  nothing is uploaded or recomputed. Scoped per owner so that one user's submission never
  reveals another's transcript.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from app import errors
from app.jobs import JobStore
from app.messages import JobRecord, TranscribeOptions
from app import keys
from app.media import check_input_file
from app.storage import Storage

Enqueue = Callable[[JobRecord], Awaitable[None]]


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    #: new job; the job of the same idempotency key; or a finished job with the same media and options.
    how: Literal["new", "idempotent", "reused"]


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
    reuse: bool = True,
    input_name: str = "",
    webhook_url: str = "",
    sha256: str = "",
) -> Submitted:
    check_input_file(path, max_bytes=max_bytes)  # missing/empty/too large: no job at all
    if idempotency_key:
        earlier = await store.find_by_key(owner, idempotency_key)
        if earlier is not None:
            return Submitted(earlier, "idempotent")
    # The web process hashes uploads while they stream in: no second read of the file.
    sha = sha256 or await anyio.to_thread.run_sync(sha256_of, path)
    if reuse:
        done = await store.find_reusable(owner, sha, options)
        if done is not None:
            return Submitted(done, "reused")

    job_id = uuid.uuid4().hex
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
        )
    )
    if not created:  # lost a race for the idempotency key: drop our upload, report the winner
        await storage.delete_prefix(keys.job_prefix(job_id))
        return Submitted(record, "idempotent")
    try:
        await enqueue(record)
    except errors.VtpError as exc:
        await store.fail(job_id, f"could not be queued: {exc}")
        raise
    return Submitted(record, "new")
