"""How many worker machines should run: one pure function, shared by every backend and by
``bench/fleet_sim.py``.

The rule, in order:

* **Work that needs a machine** is the queued batches plus the *orphaned* ones: batches marked
  in progress (arq's in-progress key) that no live worker reports running, i.e. whose worker
  died; they run again once their lease expires, and need a machine then. Batches a live
  worker holds need nothing more: no machine is started for them.
* **Machines for that work**: enough to transcribe the queued audio within
  ``drain_target_s`` at ``throughput`` audio seconds per wall second per machine, at least
  one when anything is waiting, never more than there are batches (a batch runs on one
  machine), and never more than ``max_machines`` in all. Every machine that is up counts,
  busy ones included: a busy worker is one batch away from taking the next.
* **Busy machines are kept**: a machine whose worker runs a job is never stopped or destroyed,
  nor one whose worker still holds a stage's lease (``Machine.holding``: the worker renews it
  while it lives, whether or not its health key was seen this tick). Idle started machines are
  left alone too: the worker exits by itself after its idle time (``--idle-exit``), which is
  what stops the machine, so the controller never races a worker that is just taking a job.
* **Broken machines go** (destroyed; they hold no lease, so no job is cut short): ``failed``;
  up for longer than ``boot_grace_s`` without its worker ever seen alive (a boot that never
  finished); or, once its worker *was* seen alive, without a live health key for longer than
  ``lost_grace_s`` (``Machine.seen``: measured from the last sighting, never from the start,
  so a missed health read, a Redis restart or a slow poll costs nothing).
* **The warm pool**: stopped machines are started before new ones are created (a start is
  seconds, a create pulls the image); stopped machines beyond ``warm_pool`` that have been
  stopped longer than ``stopped_grace_s`` are destroyed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

#: The states a backend reports, in Fly's words (Kubernetes Jobs are mapped onto them).
MachineState = Literal["created", "starting", "started", "stopping", "stopped", "failed", "destroying", "destroyed"]
#: States in which a machine is (or is about to be) running a worker.
UP = frozenset({"created", "starting", "started"})


@dataclass(frozen=True)
class Machine:
    """One worker machine as the controller sees it: the backend's view plus the worker's health."""

    id: str
    state: MachineState
    #: Unix time of the last state change (Fly's ``updated_at``; a Job's start or completion).
    since: float
    #: The worker on it has a live health key.
    alive: bool = False
    #: Jobs the worker reports running (its health key's ``j_ongoing``).
    running: int = 0
    #: Whether the backend can start it again (a stopped Fly machine; never a finished Job).
    restartable: bool = True
    #: Unix time its worker was last seen alive (health key present) by the controller; None:
    #: never (the controller's memory, ``loop.Sightings``). Older than ``since``: a previous run.
    seen: float | None = None
    #: Its worker holds a lease on a stage job (``vtp:holds:<queue>:<name>``, renewed with the
    #: lease): it is working, whatever its health key says. Never destroyed while so.
    holding: bool = False

    @property
    def busy(self) -> bool:
        return self.alive and self.running > 0

    @property
    def keep(self) -> bool:
        """Never destroyed: its worker runs a job, or holds a stage's lease."""
        return self.busy or self.holding


@dataclass(frozen=True)
class QueueView:
    """The GPU queue at one moment (``queue.read_queue``)."""

    #: Batches waiting for a worker (ready now or deferred for a retry).
    queued: int = 0
    #: Seconds of speech in those batches.
    queued_audio_s: float = 0.0
    #: Batches with an in-progress key (a worker started them; it may since have died).
    in_progress: int = 0
    #: Jobs that live workers report running (their health keys), whichever machine they are on.
    held: int = 0


@dataclass(frozen=True)
class Policy:
    """The controller's knobs (``Settings`` → ``Policy.from_settings``)."""

    max_machines: int = 4
    #: Drain the queued audio within this many seconds...
    drain_target_s: float = 600.0
    #: ...at this many audio seconds transcribed per wall second by one machine (measured).
    throughput: float = 30.0
    #: Batches one machine runs at once (the GPU worker's concurrency).
    slots: int = 1
    #: Stopped machines kept for fast starts; more are destroyed after ``stopped_grace_s``.
    warm_pool: int = 2
    stopped_grace_s: float = 600.0
    #: A machine up this long without its worker ever seen alive is broken (scheduling, a node
    #: scale-up, the image pull and the model load included).
    boot_grace_s: float = 900.0
    #: A machine whose worker was seen alive is broken after this long without a live health key.
    lost_grace_s: float = 60.0


@dataclass(frozen=True)
class Plan:
    """What to change now: bring ``start`` more machines up (stopped ones first), destroy these."""

    start: int = 0
    destroy: tuple[str, ...] = ()
    #: Machines that should be up, for logs and the simulation.
    target: int = 0
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def machines_for(queued: int, queued_audio_s: float, policy: Policy) -> int:
    """Machines needed to drain ``queued`` batches of ``queued_audio_s`` within the target."""
    if queued <= 0:
        return 0
    rate = max(policy.throughput, 1e-9) * max(policy.drain_target_s, 1e-9)
    wanted = max(1, math.ceil(queued_audio_s / rate - 1e-9))
    return min(wanted, math.ceil(queued / max(policy.slots, 1)))


def broken(m: Machine, policy: Policy, now: float) -> bool:
    """Destroy it as broken? Never while its worker is alive or holds a lease."""
    if m.alive or m.holding:
        return False
    if m.state == "failed":
        return True
    if m.state not in UP:
        return False
    if m.seen is None or m.seen < m.since:  # not seen alive in this run: still booting?
        return now - m.since > policy.boot_grace_s
    return now - m.seen > policy.lost_grace_s


def decide(queue: QueueView, machines: list[Machine], policy: Policy, now: float) -> Plan:
    up = [m for m in machines if m.state in UP]
    # Held by a live worker: per the health keys (workers the backend does not know included),
    # or per the machines' workers where the caller did not count them.
    live_running = max(queue.held, sum(m.running for m in machines if m.alive))
    orphaned = max(queue.in_progress - live_running, 0)
    waiting = queue.queued + orphaned
    # Orphaned batches' audio is unknown here (their payload is not read): count them at the
    # queued batches' mean, or a full Whisper window each when nothing else is queued.
    mean = queue.queued_audio_s / queue.queued if queue.queued else 30.0
    waiting_audio = queue.queued_audio_s + orphaned * mean

    destroy: list[str] = []
    gone = [m for m in machines if broken(m, policy, now)]
    destroy += [m.id for m in gone]
    healthy_up = [m for m in up if m not in gone]

    busy = [m for m in healthy_up if m.busy]
    # Busy machines count as capacity for the queue too: each is one batch (seconds, at most
    # VTP_TRANSCRIBE_TIMEOUT) from taking the next. Adding a machine per busy one instead keeps
    # adding machines at steady state, when a queue behind busy workers is normal.
    target = min(policy.max_machines, machines_for(waiting, waiting_audio, policy))
    # Never below what is running jobs (those are never stopped), even past a lowered cap.
    target = max(target, len(busy))
    start = max(target - len(healthy_up), 0)

    stopped = sorted((m for m in machines if m.state == "stopped"), key=lambda m: m.since, reverse=True)
    restartable = [m for m in stopped if m.restartable]
    keep = policy.warm_pool + min(start, len(restartable))  # those about to be started stay
    for m in restartable[keep:] + [m for m in stopped if not m.restartable]:
        if now - m.since > policy.stopped_grace_s and not m.holding:
            destroy.append(m.id)

    reason = (
        f"{queue.queued} queued ({queue.queued_audio_s:.0f} s audio), {queue.in_progress} in progress "
        f"({orphaned} orphaned); {len(healthy_up)} up, {len(busy)} busy -> target {target}"
    )
    return Plan(start=start, destroy=tuple(destroy), target=target, reason=reason)
