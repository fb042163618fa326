"""The fleet controller's decision function against a day's burst, simulated; beside two naive policies.

    python bench/fleet_sim.py [--lectures 300] [--hours 2] [--seed 1] [--cpu-throughput X] [--write docs/benchmarks.md]

An arrival trace (``--lectures`` uploads of 5-90 min, at random times over ``--hours``) is
replayed against simulated worker machines, second by second:

* **controller**: every ``TICK_S`` seconds the SAME ``workers.controller.decide.decide`` that
  ``vtp controller`` runs looks at the simulated queue and machines; a machine it starts boots
  in 30-90 s (a create: image pull and model load) or 10-20 s (a stopped machine of the warm
  pool), then takes batches until the queue has been empty for ``IDLE_EXIT_S`` and exits.
* **always-on**: one machine, up from the first upload to the last transcript.
* **per-job**: a fresh machine per upload (30-90 s cold start), destroyed when its job is done.

Every machine is billed from its start request until it stops (as Fly bills a started machine);
busy time is time spent transcribing a batch. A job is: CPU pre-processing (extract + VAD, on
always-on CPU workers: 2 s + audio/150), batches of ``BATCH_AUDIO_S`` of speech (90% of the
audio is speech) at the machine's throughput, then 2 s of merge and render.

Throughputs: the CPU size's is vtp's measured rate on 2 cores (docs/benchmarks.md's CPU table,
the bundled tiny.en, CTranslate2 int8; ``--measure-cpu`` measures it again on a quiet machine),
taken as a Fly ``performance-2x`` (2 dedicated cores); the GPU's (an ``a100-40gb``) is the
design card's 30x realtime claim for large-v3 by default. ``bench/gpu_throughput.py`` has since
measured 300x for the engine at vtp's defaults on an H100 (docs/benchmarks.md): pass
``--gpu-throughput`` with that or your own measurement.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import costs  # noqa: E402
from bench.report import machine as machine_line, write_section  # noqa: E402
from workers.controller.decide import Machine, Policy, QueueView, decide  # noqa: E402

TICK_S = 5
IDLE_EXIT_S = 60
BATCH_AUDIO_S = 200.0  # VTP_BATCH_SIZE 8 chunks of ~25 s of speech
SPEECH_FRACTION = 0.9
COLD_START_S = (30.0, 90.0)
SWEEP_DRAIN = (150, 300, 600, 900)
#: vtp on long_ivr_talk_ivr.m4a (401 s) in docs/benchmarks.md's CPU table: 56.0x realtime on 2 cores.
CPU_MEASURED = 56.0
SWEEP_IDLE = (20, 60, 120)
WARM_START_S = (10.0, 20.0)


@dataclass
class Job:
    id: int
    arrival: float
    duration: float
    batches_left: int = 0
    ready_at: float = 0.0  # CPU pre-processing done: batches queued
    done_at: float | None = None


@dataclass
class Batch:
    job: Job
    audio: float


@dataclass
class SimMachine:
    id: str
    requested_at: float
    ready_at: float
    state: str = "starting"  # starting, started, stopped, destroyed
    since: float = 0.0
    batch: Batch | None = None
    batch_end: float = 0.0
    idle_since: float = 0.0
    billed: float = 0.0
    busy: float = 0.0
    only_job: int | None = None  # per-job policy


@dataclass
class Result:
    policy: str
    kind: str
    throughput: float
    billed_s: float
    busy_s: float
    peak: int
    machines: int
    latencies: list[float] = field(default_factory=list)
    audio_s: float = 0.0

    @property
    def busy_pct(self) -> float:
        return 100.0 * self.busy_s / self.billed_s if self.billed_s else 0.0

    def cost(self, price: float) -> float:
        return self.billed_s / 3600.0 * price


def trace(lectures: int, hours: float, seed: int) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, hours * 3600) for _ in range(lectures))
    return [(t, rng.uniform(5, 90) * 60) for t in arrivals]


def simulate(
    policy: str, arrivals: list[tuple[float, float]], throughput: float, *, max_machines: int, seed: int,
    drain_target_s: float = 600.0, idle_exit_s: float = IDLE_EXIT_S,
) -> Result:
    rng = random.Random(seed + 1)
    jobs = [Job(i, t, d) for i, (t, d) in enumerate(arrivals)]
    pending = deque(jobs)  # not yet arrived
    prepping: list[Job] = []
    queue: deque[Batch] = deque()
    per_job_queues: dict[int, deque[Batch]] = {}
    machines: list[SimMachine] = []
    ctl = Policy(max_machines=max_machines, drain_target_s=drain_target_s, throughput=throughput, warm_pool=2,
                 stopped_grace_s=600, boot_grace_s=300)
    peak = 0
    t = 0.0
    done = 0

    def new_machine(now: float, cold: bool, only_job: int | None = None) -> SimMachine:
        boot = rng.uniform(*(COLD_START_S if cold else WARM_START_S))
        m = SimMachine(id=f"m{len(machines)}", requested_at=now, ready_at=now + boot, since=now, only_job=only_job)
        machines.append(m)
        return m

    if policy == "always-on":
        m = new_machine(0.0, cold=False)
        m.ready_at = 0.0  # warm before the first upload
    while done < len(jobs):
        # uploads arrive; CPU pre-processing ends and queues the batches
        while pending and pending[0].arrival <= t:
            job = pending.popleft()
            job.ready_at = job.arrival + 2 + job.duration / 150
            prepping.append(job)
        for job in [j for j in prepping if j.ready_at <= t]:
            prepping.remove(job)
            speech = job.duration * SPEECH_FRACTION
            n = max(1, math.ceil(speech / BATCH_AUDIO_S))
            job.batches_left = n
            batches = [Batch(job, speech / n) for _ in range(n)]
            if policy == "per-job":
                per_job_queues[job.id] = deque(batches)
                new_machine(t, cold=True, only_job=job.id)
            else:
                queue.extend(batches)
        # the controller looks every TICK_S seconds
        if policy == "controller" and int(t) % TICK_S == 0:
            view = QueueView(queued=len(queue), queued_audio_s=sum(b.audio for b in queue),
                             in_progress=sum(1 for m in machines if m.batch is not None))
            seen = [
                Machine(id=m.id, state=m.state, since=m.since, alive=m.state == "started" and t >= m.ready_at,
                        running=1 if m.batch else 0, restartable=m.state == "stopped")
                for m in machines if m.state != "destroyed"
            ]
            plan = decide(view, seen, ctl, t)
            for mid in plan.destroy:
                target = next(m for m in machines if m.id == mid)
                if target.batch is None:
                    target.state = "destroyed"
            warm = sorted((m for m in machines if m.state == "stopped"), key=lambda m: -m.since)
            for _ in range(plan.start):
                if warm:
                    m = warm.pop(0)
                    m.state, m.since, m.requested_at = "starting", t, t
                    m.ready_at = t + rng.uniform(*WARM_START_S)
                else:
                    new_machine(t, cold=True)
        # machines work
        for m in machines:
            if m.state == "starting" and t >= m.ready_at:
                m.state, m.since, m.idle_since = "started", t, t
            if m.state not in ("starting", "started"):
                continue
            m.billed += 1
            if m.state != "started":
                continue
            source = per_job_queues.get(m.only_job) if m.only_job is not None else queue
            # Batches end between ticks: the next one starts when the last ended, not at the tick.
            while m.batch is not None and m.batch_end <= t:
                job = m.batch.job
                job.batches_left -= 1
                if job.batches_left == 0:
                    job.done_at = m.batch_end + 2
                    done += 1
                ended, m.batch, m.idle_since = m.batch_end, None, m.batch_end
                if source:
                    m.batch = source.popleft()
                    m.batch_end = ended + m.batch.audio / throughput
                    m.busy += m.batch.audio / throughput
            if m.batch is None and source:
                m.batch = source.popleft()
                m.batch_end = t + m.batch.audio / throughput
                m.busy += m.batch.audio / throughput
            if m.batch is None:
                if policy == "per-job" and not per_job_queues.get(m.only_job):
                    m.state = "destroyed"
                elif policy == "controller" and not queue and t - m.idle_since >= idle_exit_s:
                    m.state, m.since = "stopped", t
        peak = max(peak, sum(1 for m in machines if m.state in ("starting", "started")))
        t += 1
        if t > 7 * 24 * 3600:
            raise RuntimeError(f"{policy}: not done after a week of simulated time")
    if policy == "always-on":  # it stays up until the last transcript, not a second longer
        machines[0].billed = max(j.done_at for j in jobs)
    return Result(
        policy=policy, kind="", throughput=throughput,
        billed_s=sum(m.billed for m in machines), busy_s=sum(m.busy for m in machines),
        peak=peak, machines=len(machines),
        latencies=[j.done_at - j.arrival for j in jobs], audio_s=sum(j.duration for j in jobs),
    )


def measure_cpu_throughput() -> float:
    """Audio seconds per wall second of the local runner on this machine (bundled tiny.en, int8)."""
    import tempfile

    import anyio

    from app.config import Settings
    from app.messages import TranscribeOptions
    from workers.engines.pool import EnginePool
    from workers.local_runner import LocalRunner

    runner = LocalRunner(Settings.from_env({}), engines=EnginePool())
    media = ROOT / "tests" / "data" / "ivr_prompts.mp4"
    best = 0.0
    with tempfile.TemporaryDirectory() as out:
        for _ in range(3):
            started = time.perf_counter()
            result = anyio.run(runner.run, media, TranscribeOptions(), Path(out))
            best = max(best, result.transcript.duration / (time.perf_counter() - started))
    return best


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lectures", type=int, default=300)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gpu-kind", default="a100-40gb")
    ap.add_argument("--gpu-throughput", type=float, default=30.0, help="audio s per wall s of one GPU machine (default: the design card's claim)")
    ap.add_argument("--gpu-max", type=int, default=8)
    ap.add_argument("--cpu-kind", default="performance-2x")
    ap.add_argument(
        "--cpu-throughput", type=float, default=CPU_MEASURED,
        help="audio s per wall s of one CPU machine (default: vtp's measured rate in docs/benchmarks.md's CPU table)",
    )
    ap.add_argument("--measure-cpu", action="store_true", help="measure the CPU rate now instead (needs a quiet machine)")
    ap.add_argument("--cpu-max", type=int, default=16)
    ap.add_argument("--write", type=Path, default=None, help="replace this section of a markdown file")
    args = ap.parse_args()

    cpu_tp = measure_cpu_throughput() if args.measure_cpu else args.cpu_throughput
    arrivals = trace(args.lectures, args.hours, args.seed)
    audio_h = sum(d for _, d in arrivals) / 3600
    rows = []
    for kind, tp, cap in ((args.gpu_kind, args.gpu_throughput, args.gpu_max), (args.cpu_kind, cpu_tp, args.cpu_max)):
        price = costs.PRICES[kind]
        for policy in ("controller", "always-on", "per-job"):
            started = time.perf_counter()
            r = simulate(policy, arrivals, tp, max_machines=cap, seed=args.seed)
            r.kind = kind
            took = time.perf_counter() - started
            rows.append((r, price))
            print(f"{kind:15} {policy:10} busy {r.busy_pct:5.1f}%  p95 {pct(r.latencies, 95) / 60:7.1f} min  "
                  f"${r.cost(price) / audio_h:.4f}/audio h  ({took:.1f} s)", flush=True)

    low, high = costs.MANAGED_STT_PER_AUDIO_HOUR
    lines = [
        f"Machine: {machine_line()}. Trace: {args.lectures} lectures of 5-90 min ({audio_h:.0f} audio hours) "
        f"uploaded at random over {args.hours:g} h (seed {args.seed}). Command: `python bench/fleet_sim.py --write docs/benchmarks.md`.",
        "",
        f"Throughputs: **{args.gpu_kind}** {args.gpu_throughput:g} audio s per s "
        + ("(the design card's claim for large-v3; an H100 measured 300 for the engine alone, section GPU)" if args.gpu_throughput == 30.0 else "(given)")
        + f"; **{args.cpu_kind}** {cpu_tp:.1f} audio s per s "
        + (
            "(measured in this run: the bundled tiny.en, CTranslate2 int8, on this machine's cores)" if args.measure_cpu
            else "(vtp's measured rate on the 6.7-minute file in the CPU table above: tiny.en, CTranslate2 int8, 2 cores, quiet machine)"
            if args.cpu_throughput == CPU_MEASURED else "(given)"
        )
        + f". Cold start {COLD_START_S[0]:g}-{COLD_START_S[1]:g} s, warm-pool start {WARM_START_S[0]:g}-{WARM_START_S[1]:g} s, "
        f"idle exit {IDLE_EXIT_S} s, controller tick {TICK_S} s, drain target 600 s (the default), batches of {BATCH_AUDIO_S:g} s of speech. "
        "Prices: list $/h from `app.costs.PRICES`. Billed = from start request to stop; busy = transcribing.",
        "",
        "| machine | policy | peak machines | machines made | billed machine-h | busy machine-h | busy | p50 / p95 upload -> transcript | $ total | $ per audio hour |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, price in rows:
        lines.append(
            f"| {r.kind} (${price:g}/h) | {r.policy} | {r.peak} | {r.machines} | {r.billed_s / 3600:.1f} | {r.busy_s / 3600:.1f} | "
            f"{r.busy_pct:.1f}% | {pct(r.latencies, 50) / 60:.1f} / {pct(r.latencies, 95) / 60:.1f} min | "
            f"${r.cost(price):.2f} | ${r.cost(price) / audio_h:.4f} |"
        )
    lines += ["", f"Managed speech-to-text for the same audio: ${low:.2f}-${high:.2f} per audio hour "
              f"(${low * audio_h:.0f}-${high * audio_h:.0f} for this trace)."]
    gpu_price = costs.PRICES[args.gpu_kind]
    lines += [
        "",
        f"What the controller's two knobs trade, {args.gpu_kind} at {args.gpu_throughput:g} audio s per s, same trace "
        "(busy share of billed time / p95 upload -> transcript / $ per audio hour):",
        "",
        "| drain target \\ idle exit | " + " | ".join(f"{i} s" for i in SWEEP_IDLE) + " |",
        "|---|" + "---|" * len(SWEEP_IDLE),
    ]
    for drain in SWEEP_DRAIN:
        cells = []
        for idle in SWEEP_IDLE:
            r = simulate("controller", arrivals, args.gpu_throughput, max_machines=args.gpu_max, seed=args.seed,
                         drain_target_s=drain, idle_exit_s=idle)
            cells.append(f"{r.busy_pct:.1f}% / {pct(r.latencies, 95) / 60:.1f} min / ${r.cost(gpu_price) / audio_h:.3f}")
        lines.append(f"| {drain} s | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "fleet_sim", "Fleet controller: simulated burst", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
