"""The commands that need Redis ($REDIS_URL): run workers, submit jobs, follow and cancel them.

    vtp worker --queue cpu|gpu [--concurrency N]   run an arq worker (see docs/distributed.md)
    vtp worker --queue cpu|gpu --check             exit 0 if that worker is alive, else 1
    vtp submit FILE... [--wait] [-o DIR]           upload, record and enqueue; --wait follows and writes outputs
    vtp status [JOB_ID...] [--json]                show jobs (the latest 20 without ids)
    vtp cancel JOB_ID...                           stop jobs that have not ended

Nothing here imports arq: the ``workers.runtime`` modules are imported when a command needs them
(``vtp worker --check`` only the light ``health``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from functools import partial
from pathlib import Path

import anyio
import msgspec

from app import costs, dag, errors
from app.cli_options import add_transcribe_options, error, options_from_args, print_summary, unique_basenames
from app.config import Settings
from app.jobs import JobStore
from app.redis_outage import redis_location
from app.messages import JobRecord
from app.storage import Storage, download_outputs, open_storage


def add_commands(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="run an arq worker for one queue on Redis ($REDIS_URL)")
    w.add_argument("--queue", choices=["cpu", "gpu"], required=True, help="cpu: extract, segment, merge, render, notify; gpu: transcribe")
    w.add_argument("--concurrency", type=int, default=None, help="jobs at a time (default: CPU count for cpu, $VTP_GPU_JOBS for gpu: 4 on CUDA, 1 on CPU)")
    w.add_argument("--name", default=None, help="this worker's name in its health key (default: the host name)")
    w.add_argument("--check", action="store_true", help="exit 0 if the named worker is alive, 1 if not (health checks)")
    w.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    w.add_argument(
        "--idle-exit", type=float, default=None, metavar="SECONDS",
        help="exit (code 0) once the queue has been empty and nothing has run for SECONDS (default $VTP_IDLE_EXIT; 0: never)",
    )
    w.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("submit", help="enqueue media files on Redis; --wait follows them and writes the outputs")
    s.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    s.add_argument("--wait", action="store_true", help="show progress until every job ends, then write the outputs")
    s.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where outputs go with --wait (default: .)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--idempotency-key", default="", help="submitting again with the same key returns the same job (KEY:N for the Nth of several files)")
    s.add_argument("--owner", default="", help="who the jobs belong to (scopes idempotency keys and reuse)")
    s.add_argument("--no-reuse", action="store_true", help="transcribe again even if a finished job has the same media and options")
    s.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                   help="with --wait: give up on a job that shows no progress for S seconds (default $VTP_STALL_TIMEOUT, 900)")
    add_transcribe_options(s)
    # Unset --batch-size means VTP_BATCH_SIZE: in the DAG it is also the fan-out unit.
    s.set_defaults(batch_size=None, func=cmd_submit)

    st = sub.add_parser("status", help="show distributed jobs")
    st.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="default: the latest 20 jobs")
    st.add_argument("--json", action="store_true", help="print the job records as JSON lines")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cancel", help="cancel distributed jobs that have not ended")
    c.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    c.set_defaults(func=cmd_cancel)


# -- worker -----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.runtime import health

    if args.check:
        for warning in asyncio.run(redis_warnings(settings)):
            print(f"vtp: warning: {warning}", file=sys.stderr, flush=True)
        ok, detail = asyncio.run(health.check_health(args.queue, settings, name=args.name))
        print(detail, file=sys.stdout if ok else sys.stderr, flush=True)
        return 0 if ok else 1
    if args.concurrency is not None and args.concurrency < 1:
        raise errors.OptionsError("--concurrency must be at least 1")
    if args.idle_exit is not None and args.idle_exit < 0:
        raise errors.OptionsError("--idle-exit must be 0 (never) or a number of seconds")
    level = logging.WARNING if args.quiet else logging.INFO
    for name in ("arq", "vtp"):
        logging.getLogger(name).setLevel(level)
    from workers.runtime.worker import run_worker

    asyncio.run(
        run_worker(
            args.queue, settings, concurrency=args.concurrency, name=args.name, burst=args.burst, idle_exit=args.idle_exit
        )
    )
    return 0


async def redis_warnings(settings: Settings) -> list[str]:
    """What about this Redis could lose jobs: an eviction policy other than ``noeviction``."""
    store = JobStore.open(settings.redis_url, outage_s=1)
    try:
        policy = await store.eviction_policy()
    except errors.QueueError:
        return []  # unreachable: check_health says so
    finally:
        await store.aclose()
    if policy is None or policy == "noeviction":
        return []
    return [
        f"Redis maxmemory-policy is {policy}: under memory pressure Redis would evict job records and "
        "queued stages, and jobs would be lost; set maxmemory-policy noeviction"
    ]


# -- submit -----------------------------------------------------------------------------------


def _input_error(path: Path, exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith(path.name) or str(path) in text else f"{path}: {text}"


async def write_outputs(storage: Storage, record: JobRecord, output_dir: Path, basename: str) -> dict[str, Path]:
    return await download_outputs(storage, record.outputs, output_dir, basename)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if args.batch_size is None:
        args.batch_size = settings.batch_size
    options = options_from_args(args)
    return anyio.run(_submit, args, settings, options)


async def _submit(args: argparse.Namespace, settings: Settings, options) -> int:
    from app.progress import ProgressBar
    from app.submit import submit_file
    from workers.runtime.enqueue import connect, enqueue_first_stage

    storage = open_storage(settings.storage_url)
    redis = await connect(settings)
    store = JobStore(redis, result_ttl=settings.result_ttl, where=redis_location(settings.redis_url))
    enqueue = partial(enqueue_first_stage, redis, settings=settings)
    failed = 0
    try:
        accepted = []
        names = unique_basenames(args.inputs)
        for n, (path, base) in enumerate(zip(args.inputs, names), start=1):
            key = args.idempotency_key
            if key and len(args.inputs) > 1:
                key = f"{key}:{n}"
            try:
                sub = await submit_file(
                    store, storage, enqueue, path, options,
                    basename=base, owner=args.owner, idempotency_key=key,
                    max_bytes=settings.max_input_bytes, max_duration=settings.max_duration,
                    reuse=not args.no_reuse,
                )
            except errors.InputError as exc:  # this file is unusable; the others may be fine
                failed += 1
                error(_input_error(path, exc))
                continue
            accepted.append((path, base, sub.record))
            if not args.wait:
                print(sub.record.id, flush=True)
            if sub.how != "new" and not args.quiet:
                note = {
                    "idempotent": "same idempotency key",
                    "reused": "same media and options, already done",
                }.get(sub.how, f"same media and options, {sub.record.state}")
                print(f"vtp: {path}: job {sub.record.id} ({note})", file=sys.stderr, flush=True)
        if args.wait:
            for path, base, record in accepted:
                bar = ProgressBar(path.name, enabled=not args.quiet)
                try:
                    final = await store.wait(record.id, on_event=bar, stall_s=args.stall_timeout or settings.stall_timeout)
                except errors.JobStalled as exc:  # reported, not waited on forever; the job may still move later
                    failed += 1
                    error(f"{path}: {exc}")
                    continue
                finally:
                    bar.close()
                if final.state != dag.DONE:
                    failed += 1
                    error(_input_error(path, final.error or f"job {final.id} was {final.state}"))
                    continue
                outputs = await write_outputs(storage, final, args.output_dir, base)
                print_summary(path.name, final.duration, final.wall_seconds, outputs, final.unheard_seconds)
    finally:
        await redis.aclose()
    return 1 if failed else 0


# -- status / cancel --------------------------------------------------------------------------


def _status_line(r: JobRecord) -> str:
    line = f"{r.id}  {r.state:<12} {r.input_name}"
    if r.chunks_total:
        line += f"  {r.chunks_done}/{r.chunks_total} chunks, {r.audio_done:.0f}/{r.audio_total:.0f} s speech"
    if r.terminal:
        line += f"  {r.wall_seconds:.1f} s"
    if r.unheard_seconds:
        line += f"  {r.unheard_seconds:.1f} s speech unheard"
    if r.error:
        line += f"  ({r.error})"
    cost = costs.summary(r)
    if cost:
        line += f"  [{cost}]"
    return line


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        store = JobStore.open(settings.redis_url, result_ttl=settings.result_ttl, outage_s=3)
        missing = 0
        try:
            ids = args.job_ids or await store.list_ids(200)
            shown = 0
            for job_id in ids:
                if not args.job_ids and shown >= 20:
                    break
                record = await store.find(job_id)
                if record is None:
                    if not args.job_ids:
                        continue  # listing: an expired record is simply no longer listed
                    missing += 1
                    error(f"no job {job_id!r} (unknown id, or its record has expired)")
                    continue
                shown += 1
                if args.json:
                    print(msgspec.json.encode(record).decode(), flush=True)
                else:
                    print(_status_line(record), flush=True)
        finally:
            await store.aclose()
        return 1 if missing else 0

    return anyio.run(run)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        store = JobStore.open(settings.redis_url, result_ttl=settings.result_ttl, outage_s=3)
        bad = 0
        try:
            for job_id in args.job_ids:
                try:
                    record = await store.cancel(job_id)
                except errors.JobError as exc:
                    bad += 1
                    error(str(exc))
                    continue
                print(f"{record.id}: cancelled", flush=True)
        finally:
            await store.aclose()
        return 1 if bad else 0

    return anyio.run(run)
