"""The fleet controller's decision function against a day's burst, simulated, beside two naive
policies, on machines that can be rented today, at their measured rates: $ per audio hour.

    python -m bench.fleet_sim [--lectures 300] [--hours 2] [--seed 1] [--write docs/benchmarks.md]
    python -m bench.fleet_sim --rate gke-g2-standard-4-l4=docs/logs/gpu_rates-<date>-l4.json
    python -m bench.fleet_sim --rate eks-g5.xlarge-a10g=8:120,32:400      # fill:x-realtime pairs

An arrival trace (``--lectures`` uploads of 5-90 min, at random times over ``--hours``) is
replayed against simulated worker machines, second by second:

* **controller**: every ``TICK_S`` seconds the SAME ``workers.controller.decide.decide`` that
  ``vtp controller`` runs looks at the simulated queue and machines; a machine it starts boots
  in 30-90 s (a create: image pull and model load) or 10-20 s (a stopped machine of the warm
  pool), then takes batches until the queue has been empty for ``IDLE_EXIT_S`` and exits.
* **always-on**: one machine, up from the first upload to the last transcript.
* **per-job**: a fresh machine per upload (30-90 s cold start), destroyed when its job is done.

Every machine is billed from its start request until it stops; busy time is time spent
transcribing. A job is: CPU pre-processing (extract + VAD, on always-on CPU workers: 2 s +
audio/150), batches of ``BATCH_AUDIO_S`` of speech (90% of the audio is speech), then 2 s of
merge and render.

**Rates are measured, never assumed.** A machine kind gets a rate only from a measurement:

* **CPU** (``fly-performance-2x``): vtp's x realtime in docs/benchmarks.md's CPU table (the
  ``vtp (bs 8, beam 5)`` row of the longest file), parsed from that file at run time: 2 cores,
  the bundled tiny.en, CTranslate2 int8, one batch at a time.
* **GPU**: ``--rate KIND=FILE`` with the rates JSON ``bench/gpu_throughput.py`` wrote on that GPU
  (end-to-end rates per decode-batch fill when it has them, else the engine's), or
  ``--rate KIND=FILL:XRT,...``. A GPU worker runs ``--gpu-slots`` transcribe batches at once (as
  ``VTP_GPU_JOBS``), whose ``CHUNKS_PER_BATCH`` chunks share decode calls: with k running, the
  fill is ``min(k x 8, decode batch)`` and the machine transcribes at the measured rate for that
  fill (linear between measured fills), shared among the k.

Prices come from ``--prices`` (``bench/prices.toml``: source, date, and whether the provider's own
page confirmed it). A kind with a price but no measured rate gets only its break-even: the x
realtime at which, fully busy, it costs what each managed STT service charges.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.report import machine as machine_line, write_section
from workers.controller.decide import Machine, Policy, QueueView, decide

TICK_S = 5
IDLE_EXIT_S = 60
BATCH_AUDIO_S = 200.0  # VTP_BATCH_SIZE 8 chunks of ~25 s of speech
SPEECH_FRACTION = 0.9
COLD_START_S = (30.0, 90.0)
SWEEP_DRAIN = (150, 300, 600, 900)
#: A transcribe job's chunks (VTP_BATCH_SIZE): a GPU worker's decode fill is 8 per batch it runs.
CHUNKS_PER_BATCH = 8
DOCS = ROOT / "docs" / "benchmarks.md"
PRICES_FILE = ROOT / "bench" / "prices.toml"
TODAY = "2026-12-01"
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
    running: list = field(default_factory=list)  # [batch, audio seconds left]
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
    policy: str, arrivals: list[tuple[float, float]], throughput: float | Callable[[int], float], *, max_machines: int,
    seed: int, drain_target_s: float = 600.0, idle_exit_s: float = IDLE_EXIT_S, slots: int = 1,
) -> Result:
    """``throughput``: a machine's audio seconds per second, or a function of how many batches it
    runs at once (up to ``slots``) giving its total rate, which those batches share."""
    rate = throughput if callable(throughput) else (lambda _k, tp=throughput: tp)
    full_rate = rate(slots)
    rng = random.Random(seed + 1)
    jobs = [Job(i, t, d) for i, (t, d) in enumerate(arrivals)]
    pending = deque(jobs)  # not yet arrived
    prepping: list[Job] = []
    queue: deque[Batch] = deque()
    per_job_queues: dict[int, deque[Batch]] = {}
    machines: list[SimMachine] = []
    ctl = Policy(max_machines=max_machines, drain_target_s=drain_target_s, throughput=full_rate, warm_pool=2,
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
                             in_progress=sum(len(m.running) for m in machines))
            seen = [
                Machine(id=m.id, state=m.state, since=m.since, alive=m.state == "started" and t >= m.ready_at,
                        running=len(m.running), restartable=m.state == "stopped")
                for m in machines if m.state != "destroyed"
            ]
            plan = decide(view, seen, ctl, t)
            for mid in plan.destroy:
                target = next(m for m in machines if m.id == mid)
                if not target.running:
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
            # This second's work, exactly: the batches running share the machine's rate for
            # their number; one that ends frees its slot for the next at that instant.
            budget = 1.0
            while budget > 1e-9:
                while len(m.running) < slots and source:
                    b = source.popleft()
                    m.running.append([b, b.audio])
                if not m.running:
                    break
                each = rate(len(m.running)) / len(m.running)
                dt = min(budget, min(left for _b, left in m.running) / each)
                for item in m.running:
                    item[1] -= each * dt
                budget -= dt
                m.busy += dt
                now = t + 1.0 - budget
                for item in [i for i in m.running if i[1] <= 1e-9]:
                    m.running.remove(item)
                    job = item[0].job
                    job.batches_left -= 1
                    if job.batches_left == 0:
                        job.done_at = now + 2
                        done += 1
                    m.idle_since = now
            if not m.running:
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


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def load_prices(path: Path) -> tuple[list[dict], list[dict]]:
    """The machine kinds rentable today (those with ``gone_after`` past are dropped) and the
    managed STT prices, cheapest first."""
    import tomllib

    data = tomllib.loads(path.read_text())
    machines = [m for m in data.get("machine", []) if not m.get("gone_after") or m["gone_after"] > TODAY]
    return machines, sorted(data.get("stt", []), key=lambda s: s["per_audio_hour"])


def cpu_rate_from_docs(path: Path = DOCS) -> tuple[float, str, str]:
    """vtp's x realtime on the longest file of the CPU table in docs/benchmarks.md (the
    ``vtp (bs 8, beam 5)`` row), that file's name, and the table's machine."""
    text = path.read_text()
    section = text.split("<!-- cpu_vs_peers:begin -->", 1)[1].split("<!-- cpu_vs_peers:end -->", 1)[0]
    machine = section.strip().splitlines()[0].removeprefix("Machine: ").split(" (", 1)[0].split(". ", 1)[0]
    best: tuple[float, float, str] | None = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[2] == "vtp (bs 8, beam 5)":
            audio, xrt = float(cells[1]), float(cells[3].rstrip("x"))
            if best is None or audio > best[0]:
                best = (audio, xrt, cells[0])
    if best is None:
        raise SystemExit(f"{path}: no 'vtp (bs 8, beam 5)' row in the cpu_vs_peers table")
    return best[1], best[2], machine


def parse_rate(spec: str) -> tuple[list[tuple[float, float]], str]:
    """``FILE.json`` (bench/gpu_throughput.py's rates: end to end if it has them, else vtp's
    engine at beam 5) or ``FILL:XRT,...``: (fill, x realtime) points and where they came from."""
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        data = json.loads(path.read_text())
        if data.get("smoke"):
            print(f"warning: {spec} is a CPU smoke test, not a GPU measurement", file=sys.stderr)
        points = [(float(r["fill"]), float(r["xrt"])) for r in data.get("e2e", [])]
        what = f"end to end, {data.get('machine')}, {spec}"
        if not points:
            points = [(float(r["fill"]), float(r["xrt"])) for r in data.get("engine", [])
                      if r["system"] == "vtp" and r["section"] == "real" and r["beam"] == 5]
            what = f"engine only, beam 5, {data.get('machine')}, {spec}"
        if not points:
            raise SystemExit(f"{spec}: no rates in it")
        return sorted(points), what
    points = [(float(a), float(b)) for a, b in (p.split(":") for p in spec.split(","))]
    return sorted(points), "given on the command line"


def rate_by_fill(points: list[tuple[float, float]], decode_batch: int) -> Callable[[int], float]:
    """k batches running -> the machine's rate at fill min(8k, decode batch), linear between the
    measured fills and flat past either end."""
    fills = [f for f, _ in points]
    xrts = [x for _, x in points]

    def rate(k: int) -> float:
        import numpy as np

        return float(np.interp(min(k * CHUNKS_PER_BATCH, decode_batch), fills, xrts))

    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lectures", type=int, default=300)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prices", type=Path, default=PRICES_FILE)
    ap.add_argument("--rate", action="append", default=[], metavar="KIND=FILE.json|FILL:XRT,...",
                    help="a machine kind's measured rate (repeatable)")
    ap.add_argument("--cpu-kind", default="fly-performance-2x", help="the kind the CPU table's rate is taken for")
    ap.add_argument("--docs", type=Path, default=DOCS, help="where the CPU table is read from")
    ap.add_argument("--gpu-slots", type=int, default=4, help="transcribe batches a GPU worker runs at once (VTP_GPU_JOBS)")
    ap.add_argument("--decode-batch", type=int, default=32, help="a GPU worker's VTP_DECODE_BATCH")
    ap.add_argument("--max-machines", type=int, default=16)
    ap.add_argument("--write", type=Path, default=None, help="replace this section of a markdown file")
    args = ap.parse_args()

    machines, stts = load_prices(args.prices)
    cpu_xrt, cpu_file, cpu_machine = cpu_rate_from_docs(args.docs)
    rates: dict[str, tuple[Callable[[int], float], int, str]] = {
        args.cpu_kind: (lambda _k: cpu_xrt, 1,
                        f"{cpu_xrt:g}x: vtp on {cpu_file} in the CPU table ({cpu_machine}; tiny.en, CTranslate2 int8, beam 5)"),
    }
    for spec in args.rate:
        kind, _, source = spec.partition("=")
        points, what = parse_rate(source)
        rates[kind] = (rate_by_fill(points, args.decode_batch), args.gpu_slots,
                       "measured " + ", ".join(f"fill {f:g}: {x:g}x" for f, x in points) + f" ({what})")
    arrivals = trace(args.lectures, args.hours, args.seed)
    audio_h = sum(d for _, d in arrivals) / 3600

    results: list[tuple[dict, Result | None, str]] = []
    for m in machines:
        price = m.get("price_hour")
        if m["kind"] in rates and price:
            fn, slots, what = rates[m["kind"]]
            for policy in ("controller", "always-on", "per-job"):
                started = time.perf_counter()
                r = simulate(policy, arrivals, fn, max_machines=args.max_machines, seed=args.seed, slots=slots)
                r.kind = m["kind"]
                results.append((m, r, what))
                print(f"{m['kind']:24} {policy:10} busy {r.busy_pct:5.1f}%  p95 {pct(r.latencies, 95) / 60:7.1f} min  "
                      f"${r.cost(price) / audio_h:.4f}/audio h  ({time.perf_counter() - started:.1f} s)", flush=True)
        else:
            results.append((m, None, rates[m["kind"]][2] if m["kind"] in rates else ""))

    def cell(v: float | None) -> str:
        return "-" if v is None else f"${v:.4f}"

    lines = [
        f"Simulated on {machine_line()}. Trace: {args.lectures} lectures of 5-90 min ({audio_h:.0f} audio hours) uploaded "
        f"at random over {args.hours:g} h (seed {args.seed}). Command: `python -m bench.fleet_sim "
        + "".join(f"--rate {r} " for r in args.rate) + "--write docs/benchmarks.md`; prices: `bench/prices.toml` "
        f"(compiled {TODAY}; sources and dates there). Cold start {COLD_START_S[0]:g}-{COLD_START_S[1]:g} s, warm-pool start "
        f"{WARM_START_S[0]:g}-{WARM_START_S[1]:g} s, idle exit {IDLE_EXIT_S} s, controller tick {TICK_S} s, drain target 600 s, "
        f"batches of {BATCH_AUDIO_S:g} s of speech; GPU workers run {args.gpu_slots} batches at once, decode batch {args.decode_batch}. "
        "Billed = from start request to stop; busy = transcribing. Prices are on-demand list prices; "
        "\"unverified\" = quoted by a third party or carried over, not confirmed on the provider's page.",
        "",
        "| machine | $/h (source checked?) | rate | policy | busy | p50 / p95 upload -> transcript | $ per audio hour |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r, what in results:
        price = m.get("price_hour")
        price_text = f"${price:g} ({'verified' if m.get('verified') else 'unverified'})" if price else "not found"
        if r is None:
            rate_text = what or ("no measured rate" + (": " + m["gpu"] + " not measured yet" if m.get("gpu") else ""))
            lines.append(f"| {m['kind']} | {price_text} | {rate_text} | - | - | - | pending a measured rate |")
            continue
        first = r.policy == "controller"
        lines.append(
            f"| {m['kind'] if first else ''} | {price_text if first else ''} | {what if first else 'same'} | {r.policy} | {r.busy_pct:.1f}% | "
            f"{pct(r.latencies, 50) / 60:.1f} / {pct(r.latencies, 95) / 60:.1f} min | {cell(r.cost(price) / audio_h)} |"
        )
    lines += [
        "",
        "Break-even against managed speech-to-text: the x realtime a machine must sustain, fully busy, to cost what each "
        "service charges per audio hour (price per hour / service's price per audio hour); where a rate was measured, "
        "the controller's simulated $ per audio hour beside it, as a fraction of the service's price.",
        "",
        "| machine | $/h | " + " | ".join(f"{s['name']} (${s['per_audio_hour']:g}/h)" for s in stts) + " |",
        "|---|---|" + "---|" * len(stts),
    ]
    controller = {r.kind: r for _m, r, _w in results if r is not None and r.policy == "controller"}
    for m in machines:
        price = m.get("price_hour")
        if not price:
            continue
        cells = []
        for stt in stts:
            need = price / stt["per_audio_hour"]
            text = f"needs {need:.1f}x"
            r = controller.get(m["kind"])
            if r is not None:
                text += f"; sim {r.cost(price) / audio_h / stt['per_audio_hour']:.1%}"
            cells.append(text)
        lines.append(f"| {m['kind']} | ${price:g} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "fleet_sim", "Fleet controller: simulated burst", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
