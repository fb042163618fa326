"""The sweeper: no job stays stuck, and ended jobs' artifacts do not stay forever.

arq reruns a stage whose worker died (its lease runs out, ``workers.runtime.worker.VtpWorker``), but
some failures leave a job with *no* stage queued or running at all, and nothing would ever move
it again:

* a ``submit`` that died between writing the record and enqueueing the first stage;
* a stage job that arq dropped: expired in its queue (``expires``), failed by arq's backstop
  timeout (a plain failure, no retry), or started once too often ("max retries exceeded", e.g.
  after repeated worker kills), so vtp's own code never ran to fail the job;
* a handoff lost between two stages (a successor refused because arq still kept an old result).

Every CPU worker runs ``Sweeper.run_forever``; a Redis lock (``vtp:sweep:lock``, SET NX with a
TTL of most of an interval) lets one pass run per interval across all of them. A pass looks at
every job that has not ended (``vtp:active``): one whose record has not changed for
``VTP_SWEEP_INTERVAL`` and that has no stage job queued or running is *re-driven*: the stage its
state needs next is enqueued again under its deterministic arq id (arq's old result and retry
count for that id are cleared first, else arq would refuse it or drop it at once). The stages
are idempotent (state checks, exactly-once fan-in), so a re-drive that races a late worker
costs a duplicate computation, never a duplicate chunk. A job re-driven ``VTP_JOB_TRIES`` times
in one state, or whose stage arq gave up on after its last try, is failed with a one-line reason.

**Every end notifies.** A job that ends with a ``webhook_url`` is marked in
``vtp:webhooks:due`` in the very transaction that ends it, whoever ends it; each pass queues the
webhook of every marked job (``queue_webhooks``), so a job this sweeper fails ("gave up after N
tries", "made no progress") gets its ``job.failed`` POST like any other. (Stages and the web
process queue the webhooks of the ends they see at once; the deterministic arq id makes the
second enqueue a no-op, and delivery skips a webhook already delivered or given up.)

The same pass deletes the storage artifacts (``jobs/<id>/``) of jobs that ended more than
``VTP_RESULT_TTL`` ago (``vtp:ended``), when their Redis keys expire too. (On S3 an object
lifecycle rule on the ``jobs/`` prefix does the same job without the sweeper: see
docs/distributed.md.)

arq itself stays in ``workers.runtime``: the sweeper sees the queue through ``StageQueue``. Which
stage each state needs, its queue and how its request is built come from the DAG table (``app.dag``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from app import dag, errors, keys
from app.config import Settings
from app.jobs import JobStore
from app.messages import JobRecord, Segmentation
from app.storage import Storage

log = logging.getLogger("vtp.sweeper")


#: One stage job to enqueue again (``app.dag.StageJob``: arq function, arguments, queue, id).
Step = dag.StageJob


class StageQueue(Protocol):
    """What the sweeper needs from the job queue (``workers.runtime.sweep.ArqStages``)."""

    async def pending(self, arq_ids: list[str]) -> bool:
        """Is any of these stage jobs queued (possibly deferred) or running under a live lease?"""
        ...

    async def failure(self, arq_id: str) -> str | None:
        """The error arq recorded for this stage job, if its kept result is a failure."""
        ...

    async def redrive(self, step: Step) -> None:
        """Forget arq's result and try count for ``step.arq_id`` (and ``step.clear``), enqueue it."""
        ...

    async def notify(self, job_id: str) -> None:
        """Queue the webhook of an ended job (a no-op while it is queued or running)."""
        ...


@dataclass
class SweepReport:
    redriven: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)


#: arq's words when it drops a job it started too often (arq.worker: "max {n} retries exceeded").
_MAX_TRIES = "retries exceeded"


class Sweeper:
    def __init__(self, store: JobStore, storage: Storage, queue: StageQueue, settings: Settings) -> None:
        self.store = store
        self.storage = storage
        self.queue = queue
        self.settings = settings
        self.token = uuid.uuid4().hex

    # -- the loop --------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Sweep every ``VTP_SWEEP_INTERVAL`` (when this worker wins the lock) until cancelled."""
        interval = self.settings.sweep_interval
        await asyncio.sleep(random.uniform(0, min(interval, 5.0)))  # workers started together spread out
        while True:
            try:
                if await self.claim():
                    report = await self.sweep()
                    if report.redriven or report.failed or report.expired:
                        log.warning(
                            "sweep: re-drove %s, failed %s, expired artifacts of %d jobs, queued webhooks of %s",
                            report.redriven, report.failed, len(report.expired), report.notified,
                        )
            except errors.VtpError as exc:  # Redis or storage away: the next pass tries again
                log.warning("sweep skipped: %s", exc)
            except Exception:  # noqa: BLE001 - the sweeper must outlive any one bad record
                log.exception("sweep failed")
            await asyncio.sleep(interval)

    async def claim(self) -> bool:
        """One pass per interval across every worker: the lock is left to expire, not released."""
        ttl_ms = max(int(self.settings.sweep_interval * 900), 100)
        return await self.store.claim_sweep(self.token, ttl_ms)

    # -- one pass --------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> SweepReport:
        now = time.time() if now is None else now
        report = SweepReport()
        for job_id in await self.store.active_ids():
            record = await self.store.find(job_id)
            if record is None or record.terminal:  # expired record, or ended meanwhile
                await self.store.forget_active(job_id)
                continue
            if now - record.updated_at < self.settings.sweep_interval:
                continue  # it moved recently
            try:
                outcome = await self.check(record)
            except errors.JobError as exc:  # its scratch state is gone: it can never finish
                outcome = f"failed: {exc}"
                await self.store.fail(job_id, str(exc))
            if outcome.startswith("re-drove"):
                report.redriven.append(job_id)
            elif outcome.startswith("failed"):
                report.failed.append(job_id)
        report.notified = await self.queue_webhooks()
        report.expired = await self.expire_artifacts(now)
        return report

    async def queue_webhooks(self) -> list[str]:
        """Queue the webhook of every ended job that still needs one: the jobs this pass failed
        ("gave up after N tries", "made no progress"), and any other end no stage saw (a job
        cancelled from the CLI while nothing of it was queued). The job store marks each in the
        same transaction that ends the job (``constants.WEBHOOKS_DUE``), so none is missed."""
        queued = []
        for job_id in await self.store.webhooks_due():
            record = await self.store.find(job_id)
            if record is not None and record.webhook_url and record.webhook is None:
                await self.queue.notify(job_id)  # a no-op if a stage or the web process queued it
                queued.append(job_id)
            await self.store.webhook_queued(job_id)
        return queued

    async def check(self, record: JobRecord) -> str:
        """Re-drive or fail one job that has not changed for a while, unless a stage of it is
        queued or running; what was done."""
        job_id = record.id
        if await self.queue.pending(await self._stage_ids(record)):
            return "alive"
        steps = await self.plan(record)
        label = steps[0].arq_id.split(":")[1] if steps else record.state
        for step in steps:
            failure = await self.queue.failure(step.arq_id)
            if failure and _MAX_TRIES in failure:
                reason = f"{label} gave up after {self.settings.job_tries} tries (worker lost or timed out)"
                await self.store.fail(job_id, reason)
                return f"failed: {reason}"
        count = await self.store.count_redrive(job_id, record.state)
        if count > self.settings.job_tries:
            reason = f"{label} made no progress after {count - 1} re-drives (stage jobs lost: is a worker for it running?)"
            await self.store.fail(job_id, reason)
            log.warning("job %s failed: %s", job_id, reason)
            return f"failed: {reason}"
        for step in steps:
            failure = await self.queue.failure(step.arq_id)
            log.warning(
                "job %s %s for %.0f s with no stage queued or running%s: re-driving %s (%d of %d)",
                job_id, record.state, time.time() - record.updated_at,
                f" (arq: {failure})" if failure else "", step.arq_id, count, self.settings.job_tries,
            )
            await self.queue.redrive(step)
        return f"re-drove {[s.arq_id for s in steps]}"

    async def plan(self, record: JobRecord) -> list[Step]:
        """The stage job(s) that move a job on from its current state, read from the DAG table
        (``app.dag``): the stage that runs in that state, or the next one once the stage's
        handoff part is stored; for the fan-out, the batches not finished (or, all in, the
        stage after it: the fan-in's job was lost)."""
        stage = dag.RUNS_IN.get(record.state)
        if stage is None:
            raise errors.JobError(f"job {record.id}: the sweeper cannot move a job in state {record.state}")
        if (
            stage.handoff_part and record.state == stage.state
            and await self.store.has_part(record.id, stage.handoff_part)
        ):  # the stage finished (its output is in) and lost its successor
            stage = dag.STAGE[stage.next[0]]
        if stage.fan_out:
            seg = await self.store.get_part(record.id, "segmentation", Segmentation)
            finished = await self.store.finished_batches(record.id)
            missing = [b for b in seg.batches if b.index not in finished]
            if not missing:  # every batch is in: the fan-in's job was lost
                return [await self._job(dag.STAGE[stage.next[0]], record)]
            parts = await self._parts(stage, record)
            return [dag.job(stage.name, record, parts, b) for b in missing]
        return [await self._job(stage, record)]

    async def _parts(self, stage: dag.StageDef, record: JobRecord) -> dict:
        return {p: await self.store.get_part(record.id, p, dag.PARTS[p]) for p in stage.needs}

    async def _job(self, stage: dag.StageDef, record: JobRecord) -> Step:
        return dag.job(stage.name, record, await self._parts(stage, record))

    async def _stage_ids(self, record: JobRecord) -> list[str]:
        """Every arq id a stage of this job can have (its batches once the segmentation is in)."""
        job_id = record.id
        out = [s.arq_id(job_id) for s in dag.STAGES if not s.fan_out]
        if await self.store.has_part(job_id, "segmentation"):
            seg = await self.store.get_part(job_id, "segmentation", Segmentation)
            out += [s.arq_id(job_id, b.index) for s in dag.STAGES if s.fan_out for b in seg.batches]
        return out

    # -- artifacts of ended jobs -----------------------------------------------------------

    async def expire_artifacts(self, now: float) -> list[str]:
        """Delete ``jobs/<id>/`` of jobs that ended more than ``VTP_RESULT_TTL`` seconds ago."""
        gone = []
        for job_id in await self.store.ended_before(now - self.settings.result_ttl):
            try:
                await self.storage.delete_prefix(keys.job_prefix(job_id))
            except errors.VtpError as exc:
                log.warning("job %s: could not delete its artifacts: %s", job_id, exc)
                continue
            await self.store.forget_ended(job_id)
            gone.append(job_id)
        return gone
