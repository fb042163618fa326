"""The controller's decision function: pure, so every rule is checked case by case."""

from __future__ import annotations

import pytest

from workers.controller.decide import Machine, Policy, QueueView, decide, machines_for

NOW = 1_000_000.0
POLICY = Policy(
    max_machines=4, drain_target_s=300, throughput=30, warm_pool=1, stopped_grace_s=600, boot_grace_s=120, lost_grace_s=60
)


def m(id: str, state: str = "started", *, alive: bool = True, running: int = 0, age: float = 10.0, restartable: bool = True) -> Machine:
    return Machine(id=id, state=state, since=NOW - age, alive=alive, running=running, restartable=restartable)


def test_nothing_queued_means_no_machines():
    plan = decide(QueueView(), [], POLICY, NOW)
    assert plan.start == 0 and plan.destroy == () and plan.target == 0


def test_sized_to_drain_the_queued_audio_within_the_target():
    # 9000 s of audio at 30 s/s per machine within 300 s: exactly 1 machine; 9001 s: 2.
    assert machines_for(40, 9000, POLICY) == 1
    assert machines_for(40, 9001, POLICY) == 2
    assert decide(QueueView(queued=40, queued_audio_s=20_000), [], POLICY, NOW).start == 3
    # at least one for anything queued, never more than there are batches
    assert machines_for(1, 0.5, POLICY) == 1
    assert machines_for(2, 100_000, POLICY) == 2


def test_capped_by_max_machines():
    plan = decide(QueueView(queued=500, queued_audio_s=500 * 240), [], POLICY, NOW)
    assert plan.start == 4 and plan.target == 4


def test_idle_live_machines_serve_the_queue_before_new_ones_start():
    plan = decide(QueueView(queued=3, queued_audio_s=90), [m("a")], POLICY, NOW)
    assert plan.start == 0
    # a machine that is booting (no worker yet) counts as well
    plan = decide(QueueView(queued=3, queued_audio_s=90), [m("a", "starting", alive=False)], POLICY, NOW)
    assert plan.start == 0


def test_no_machine_for_work_a_live_worker_holds():
    busy = m("a", running=1)
    plan = decide(QueueView(queued=0, in_progress=1), [busy], POLICY, NOW)
    assert plan.start == 0 and plan.destroy == () and plan.target == 1


def test_orphaned_work_of_a_dead_worker_gets_a_machine():
    # in progress, but no live worker runs anything: its worker died (SIGKILL, lost host)
    dead = m("a", "stopped", alive=False, age=5)
    plan = decide(QueueView(queued=0, in_progress=1), [dead], POLICY, NOW)
    assert plan.start == 1 and plan.destroy == ()


def test_busy_machines_are_never_destroyed_even_past_a_lowered_cap():
    machines = [m(str(i), running=1, age=10_000) for i in range(6)]
    plan = decide(QueueView(queued=10, queued_audio_s=3000, in_progress=6), machines, POLICY, NOW)
    assert plan.destroy == () and plan.start == 0 and plan.target == 6


def test_broken_machines_are_destroyed():
    machines = [
        m("boot-stuck", "started", alive=False, age=POLICY.boot_grace_s + 1),
        m("booting", "started", alive=False, age=POLICY.boot_grace_s - 1),
        m("failed", "failed", alive=False),
    ]
    plan = decide(QueueView(queued=2, queued_audio_s=60), machines, POLICY, NOW)
    assert set(plan.destroy) == {"boot-stuck", "failed"}
    assert plan.start == 0  # "booting" will serve the queue


def test_warm_pool_surplus_destroyed_after_grace_only():
    machines = [
        m("new", "stopped", alive=False, age=10),
        m("old1", "stopped", alive=False, age=5000),
        m("old2", "stopped", alive=False, age=6000),
    ]
    plan = decide(QueueView(), machines, POLICY, NOW)
    # warm_pool=1 keeps the newest; the others are past the grace period
    assert set(plan.destroy) == {"old1", "old2"}
    young = [m("s1", "stopped", alive=False, age=10), m("s2", "stopped", alive=False, age=20)]
    assert decide(QueueView(), young, POLICY, NOW).destroy == ()


def test_stopped_machines_about_to_be_started_are_kept():
    machines = [m(f"s{i}", "stopped", alive=False, age=5000 + i) for i in range(3)]
    plan = decide(QueueView(queued=3, queued_audio_s=30_000), machines, POLICY, NOW)
    assert plan.start == 3 and plan.destroy == ()


def test_finished_jobs_that_cannot_restart_are_cleaned_after_grace():
    done = m("job-1", "stopped", alive=False, age=5000, restartable=False)
    assert decide(QueueView(), [done], POLICY, NOW).destroy == ("job-1",)


def test_fleet_sim_runs_the_same_decision_function():
    """bench/fleet_sim.py replays a trace through decide(): a small one loses no job and bills
    at least the busy time (its numbers are in docs/benchmarks.md, not asserted here)."""
    from bench import fleet_sim

    arrivals = fleet_sim.trace(12, 0.2, seed=3)
    for policy in ("controller", "always-on", "per-job"):
        r = fleet_sim.simulate(policy, arrivals, 30.0, max_machines=3, seed=3)
        assert len(r.latencies) == 12 and all(x > 0 for x in r.latencies)
        assert 0 < r.busy_s <= r.billed_s
        assert r.peak <= (3 if policy == "controller" else 12)


def test_work_held_by_a_worker_the_backend_does_not_know_is_not_orphaned():
    # e.g. a permanent GPU worker beside the fleet, or --backend keda (no machines listed)
    plan = decide(QueueView(queued=0, in_progress=1, held=1), [], POLICY, NOW)
    assert plan.start == 0


def test_a_missed_health_read_does_not_destroy_a_running_machine():
    """Absence is measured from the last sighting, not from the machine's start: a health key
    missing for one tick (a blip, a Redis restart, a slow poll) costs nothing."""
    old = POLICY.boot_grace_s * 10
    blip = Machine(id="a", state="started", since=NOW - old, alive=False, seen=NOW - 6)
    assert decide(QueueView(queued=1, queued_audio_s=30), [blip], POLICY, NOW).destroy == ()
    lost = Machine(id="a", state="started", since=NOW - old, alive=False, seen=NOW - POLICY.lost_grace_s - 1)
    assert decide(QueueView(), [lost], POLICY, NOW).destroy == ("a",)


def test_a_machine_whose_worker_holds_a_lease_is_never_destroyed():
    long_gone = dict(state="started", since=NOW - 100_000, alive=False, seen=NOW - 50_000)
    machines = [
        Machine(id="holding", holding=True, **long_gone),
        Machine(id="never-seen", state="started", since=NOW - 100_000, alive=False, holding=True),
        Machine(id="failed", state="failed", since=NOW - 100_000, holding=True),
        Machine(id="stopped", state="stopped", since=NOW - 100_000, restartable=False, holding=True),
    ]
    assert decide(QueueView(in_progress=2), machines, POLICY, NOW).destroy == ()
    assert all(m.keep for m in machines)


def test_a_restarted_machine_gets_its_boot_grace_again():
    # seen alive in its previous run, started again (warm pool) since: booting, not lost
    again = Machine(id="a", state="started", since=NOW - 30, alive=False, seen=NOW - 5000)
    assert decide(QueueView(queued=1, queued_audio_s=30), [again], POLICY, NOW).destroy == ()
    stuck = Machine(id="a", state="started", since=NOW - POLICY.boot_grace_s - 1, alive=False, seen=NOW - 5000)
    assert decide(QueueView(), [stuck], POLICY, NOW).destroy == ("a",)


def test_the_controllers_memory_of_sightings():
    from workers.controller.loop import Sightings

    sightings = Sightings()
    old = NOW - POLICY.boot_grace_s * 10
    # a fresh controller finds a machine past its boot grace whose health key is missing right
    # now: counted as seen at this first look, so it gets the lost grace, not destruction
    (first,) = sightings.observe([Machine(id="a", state="started", since=old)], POLICY, NOW)
    assert first.seen == NOW and decide(QueueView(), [first], POLICY, NOW).destroy == ()
    (alive,) = sightings.observe([Machine(id="a", state="started", since=old, alive=True)], POLICY, NOW + 10)
    assert alive.seen == NOW + 10
    later = NOW + 10 + POLICY.lost_grace_s
    (blip,) = sightings.observe([Machine(id="a", state="started", since=old)], POLICY, later)
    assert blip.seen == NOW + 10 and decide(QueueView(), [blip], POLICY, later).destroy == ()
    (lost,) = sightings.observe([Machine(id="a", state="started", since=old)], POLICY, later + 1)
    assert decide(QueueView(), [lost], POLICY, later + 1).destroy == ("a",)
    # a machine watched while it boots is judged by its boot grace, not given more
    booting = Machine(id="b", state="started", since=NOW)
    sightings.observe([booting], POLICY, NOW + 1)
    (stuck,) = sightings.observe([booting], POLICY, NOW + POLICY.boot_grace_s + 1)
    assert stuck.seen is None and decide(QueueView(), [stuck], POLICY, NOW + POLICY.boot_grace_s + 1).destroy == ("b",)


def test_fleet_sim_rates_come_from_measurements_and_prices_from_the_table(tmp_path):
    """The CPU rate is parsed from docs/benchmarks.md's CPU table, not a constant; Fly's GPUs
    (gone after 2026-08-01) are left out of the price table; a GPU's rate follows its batch fill."""
    from bench import fleet_sim

    xrt, source_file, _machine = fleet_sim.cpu_rate_from_docs()
    assert xrt > 1 and source_file
    machines, stts = fleet_sim.load_prices(fleet_sim.PRICES_FILE)
    kinds = {m["kind"] for m in machines}
    assert "fly-performance-2x" in kinds and not {"fly-a100-40gb", "fly-l40s"} & kinds
    assert all(m.get("source") and m.get("date") for m in machines)
    assert stts[0]["per_audio_hour"] <= 0.36 and any(s["name"] == "OpenAI whisper-1" for s in stts)

    rate = fleet_sim.rate_by_fill([(8, 100.0), (32, 300.0)], decode_batch=32)
    assert rate(1) == 100.0 and rate(2) == pytest.approx(100 + 200 * 8 / 24) and rate(4) == rate(8) == 300.0
    arrivals = fleet_sim.trace(12, 0.2, seed=3)
    one = fleet_sim.simulate("always-on", arrivals, lambda k: 100.0, max_machines=1, seed=3, slots=1)
    four = fleet_sim.simulate("always-on", arrivals, rate, max_machines=1, seed=3, slots=4)
    assert four.busy_s < one.busy_s  # fuller decode batches: the same audio in less machine time

    rates = tmp_path / "rates.json"
    rates.write_text('{"machine": "X", "e2e": [{"jobs": 1, "fill": 8, "xrt": 90}, {"jobs": 4, "fill": 30, "xrt": 280}]}')
    assert fleet_sim.parse_rate(str(rates))[0] == [(8.0, 90.0), (30.0, 280.0)]
    assert fleet_sim.parse_rate("8:100,32:300")[0] == [(8.0, 100.0), (32.0, 300.0)]
