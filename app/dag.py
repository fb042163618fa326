"""The DAG, declared once: each stage's job state, queue, arq task, deadline, what follows it and
how the request of the stage that follows is built.

    vtp:cpu   extract -> segment ─┐                 ┌─> merge -> render -> notify
    vtp:gpu                       └─> transcribe ×N ┘

Everything that knows the shape of the pipeline reads this table: the arq tasks and the worker's
function list (``workers.runtime``), the sweeper's re-drive (``workers.sweeper``), the job state
machine (``check_transition`` below, and ``app.jobs``' timing names), the local runner's order and the
states ``/metrics`` and the progress bar know. ``tests/test_dag_table.py`` walks the table and
checks each of them against it. Adding a stage is one entry here plus its function and its task.

Invariants: stages are listed in pipeline order; each non-final state belongs to exactly one stage
(``notify`` has none of its own: it runs while the job is ``rendering`` and moves it to ``done``);
a stage's arq id is deterministic (``app.constants.arq_job_id``), one per batch for the fan-out.
No arq, no speech stack: the web process and the sweeper import this freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from app import constants, errors
from app.messages import (
    TERMINAL_STATES,
    ChunkBatch,
    ExtractedAudio,
    ExtractRequest,
    JobRecord,
    Rendered,
    RenderRequest,
    Segmentation,
    SegmentRequest,
    Stage,
    Transcript,
    TranscribeRequest,
    encode,
)

#: The scratch parts (``vtp:dag:<id>:<part>``) that requests are built from, and their types.
PARTS: dict[str, type] = {"audio": ExtractedAudio, "segmentation": Segmentation, "transcript": Transcript}

#: Builds the arguments of a stage's arq job from the job record, the parts it needs and, for the
#: fan-out, one batch.
Build = Callable[[JobRecord, Mapping[str, Any], "ChunkBatch | None"], tuple]


@dataclass(frozen=True)
class StageDef:
    #: The stage's name: its arq id part, its timing and machine-seconds name, its log label.
    name: str
    #: The job's state while the stage runs (``notify``: the state it moves the job into).
    state: Stage
    #: ``cpu`` or ``gpu`` (``app.constants.QUEUES``).
    queue: Literal["cpu", "gpu"]
    #: The arq task's name (``app.constants.FN_*``).
    function: str
    #: The ``Settings`` field holding the stage's deadline. Every stage runs under the worker's
    #: lease (``VTP_LEASE``), renewed while it runs.
    deadline: Literal["cpu_timeout", "transcribe_timeout"]
    #: The stages that may follow (``segment``: ``merge`` straight away when there is no speech).
    next: tuple[str, ...]
    #: Parts the stage's request is built from; ``build`` gets them.
    needs: tuple[str, ...]
    build: Build
    #: One arq job per batch of the segmentation.
    fan_out: bool = False
    #: Whether the task moves the job into ``state`` as it starts (``transcribe``: ``segment`` does
    #: once every batch is queued; ``notify``: it moves the job to ``done`` at its end).
    enters: bool = True
    #: Re-driving this stage also clears the kept arq result of its (single) successor, which would
    #: refuse the successor's enqueue.
    clears_next: bool = False
    #: A re-drive in this stage's state goes to the next stage once this part is stored (the stage
    #: finished and only its handoff was lost).
    handoff_part: str | None = None

    def timeout(self, settings: Any) -> float:
        return getattr(settings, self.deadline)

    def arq_id(self, job_id: str, batch: int | None = None) -> str:
        return constants.arq_job_id(job_id, self.name, batch)

    @property
    def queue_name(self) -> str:
        return constants.QUEUES[self.queue]


STAGES: tuple[StageDef, ...] = (
    StageDef(
        name="extract", state="extracting", queue="cpu", function=constants.FN_EXTRACT, deadline="cpu_timeout",
        next=("segment",), needs=(), clears_next=True, handoff_part="audio",
        build=lambda r, p, b: (encode(ExtractRequest(job_id=r.id, media_key=r.media_key, source_name=r.input_name)),),
    ),
    StageDef(
        name="segment", state="segmenting", queue="cpu", function=constants.FN_SEGMENT, deadline="cpu_timeout",
        next=("transcribe", "merge"), needs=("audio",),
        build=lambda r, p, b: (encode(SegmentRequest(job_id=r.id, audio=p["audio"], options=r.options)),),
    ),
    StageDef(
        name="transcribe", state="transcribing", queue="gpu", function=constants.FN_TRANSCRIBE,
        deadline="transcribe_timeout", next=("merge",), needs=(), fan_out=True, enters=False,
        build=lambda r, p, b: (encode(TranscribeRequest(job_id=r.id, batch=b, options=r.options)),),
    ),
    StageDef(
        name="merge", state="merging", queue="cpu", function=constants.FN_MERGE, deadline="cpu_timeout",
        next=("render",), needs=(), clears_next=True,
        build=lambda r, p, b: (r.id,),
    ),
    StageDef(
        name="render", state="rendering", queue="cpu", function=constants.FN_RENDER, deadline="cpu_timeout",
        next=("notify",), needs=("transcript",), clears_next=True,
        build=lambda r, p, b: (
            encode(RenderRequest(job_id=r.id, transcript=p["transcript"], formats=r.options.formats, basename=r.basename)),
        ),
    ),
    StageDef(
        name="notify", state="done", queue="cpu", function=constants.FN_NOTIFY, deadline="cpu_timeout",
        next=(), needs=("rendered",), enters=False,
        build=lambda r, p, b: (r.id, encode(p["rendered"])),
    ),
)

#: Stage name -> its definition.
STAGE: dict[str, StageDef] = {s.name: s for s in STAGES}
FIRST = STAGES[0]
#: The state a job is created in, before its first stage runs, and its timing name.
QUEUED: Stage = "queued"
QUEUED_LABEL = "queue"
DONE: Stage = "done"
FAILED: Stage = "failed"
CANCELLED: Stage = "cancelled"
#: Every state a job passes through in order, from ``queued`` to ``done``.
STATES: tuple[Stage, ...] = (QUEUED, *dict.fromkeys(s.state for s in STAGES))
#: The states of a job that has not ended.
ACTIVE_STATES: tuple[Stage, ...] = STATES[:-1]
ENDED_STATES: tuple[Stage, ...] = (DONE, FAILED, CANCELLED)
#: Position of each non-final state along the pipeline (``done`` last).
ORDER: dict[str, int] = {state: i for i, state in enumerate(STATES)}
#: The stage that runs in each active state (``queued``: the first stage, not yet started).
RUNS_IN: dict[str, StageDef] = {QUEUED: FIRST, **{s.state: s for s in STAGES if s.state != DONE}}
#: The state each state may move to (besides failed and cancelled).
NEXT_STATES: dict[str, frozenset[str]] = {
    QUEUED: frozenset({FIRST.state}),
    **{s.state: frozenset(STAGE[n].state for n in s.next) for s in STAGES if s.state != DONE},
}
#: The timing name of the time spent in each active state.
LABEL: dict[str, str] = {QUEUED: QUEUED_LABEL, **{s.state: s.name for s in STAGES if s.state != DONE}}
#: The stages each queue runs.
ON_QUEUE: dict[str, tuple[StageDef, ...]] = {q: tuple(s for s in STAGES if s.queue == q) for q in constants.QUEUES}

assert set(STATES) | set(ENDED_STATES) == set(get_args(Stage)), "app.messages.Stage and the DAG disagree"
assert set(ENDED_STATES) == TERMINAL_STATES


@dataclass(frozen=True)
class StageJob:
    """One stage job to enqueue: its arq function, arguments, queue and deterministic id."""

    arq_id: str
    function: str
    args: tuple
    queue: str
    #: ids of successors whose kept arq results must go before a re-drive (else arq refuses them)
    clear: tuple[str, ...] = ()


def job(name: str, record: JobRecord, parts: Mapping[str, Any] | None = None, batch: ChunkBatch | None = None) -> StageJob:
    """The arq job of stage ``name`` for ``record``, its request built from ``parts`` (and ``batch``
    for the fan-out); a ``KeyError`` names a part the stage needs that was not given."""
    stage = STAGE[name]
    parts = parts or {}
    missing = [p for p in stage.needs if p not in parts]
    if missing:
        raise KeyError(f"stage {name} needs {missing}")
    if stage.fan_out and batch is None:
        raise ValueError(f"stage {name} runs one job per batch: give the batch")
    clear = tuple(STAGE[n].arq_id(record.id) for n in stage.next) if stage.clears_next else ()
    return StageJob(
        arq_id=stage.arq_id(record.id, batch.index if stage.fan_out else None),
        function=stage.function,
        args=stage.build(record, parts, batch),
        queue=stage.queue_name,
        clear=clear,
    )


# -- the state machine ----------------------------------------------------------------------


def check_transition(job_id: str, current: str, to: str) -> None:
    """Raise ``JobError`` (``JobCancelled`` for a cancelled job) unless ``current -> to`` is allowed."""
    if current == CANCELLED:
        raise errors.JobCancelled(f"job {job_id} was cancelled")
    if current in TERMINAL_STATES:
        raise errors.JobError(f"job {job_id} is already {current}")
    if to == current or to in (FAILED, CANCELLED):
        return
    if to not in NEXT_STATES.get(current, ()):
        raise errors.JobError(f"job {job_id}: invalid transition {current} -> {to}")
