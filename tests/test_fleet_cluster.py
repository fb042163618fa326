"""The controller end to end: real Redis, real CPU worker, real jobs, and GPU workers on machines
of the Fly Machines API stand-in (tests/support/fly_standin.py), each a real ``vtp worker --idle-exit``
process started with the env the controller gave its machine.

* A burst of jobs makes the controller start machines (never more than VTP_MAX_MACHINES); the
  workers drain the queue and exit; the controller sees the machines stopped; every job is
  done, none lost, the queue is empty and no machine is left running.
* A worker SIGKILLed in the middle of a batch: its machine stops, the controller starts one
  again for the orphaned batch, and the job still finishes.
"""

from __future__ import annotations

import signal
from datetime import datetime
import subprocess
import sys
import time

import anyio
import pytest
import redis as redis_sync

from app import constants
from app.jobs import JobStore
from tests.support.dag_cluster import Cluster
from tests.support.fly_standin import ROOT, FlyStandin

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Fleet:
    """A CPU worker, the stand-in and a controller subprocess, all stopped at teardown."""

    def __init__(self, redis_url: str, tmp_path, **controller_env: str) -> None:
        self.cluster = Cluster(redis_url, tmp_path / "cluster")
        # REDIS_URL is an app secret, as the README's Fly steps set it: every machine has it
        self.standin = FlyStandin(work_dir=tmp_path, app_secrets={"REDIS_URL": redis_url}).start()
        self.log = tmp_path / "controller.log"
        self.env = {
            **self.cluster.env,
            "FLY_API_HOSTNAME": self.standin.url,
            "FLY_API_TOKEN": self.standin.token,
            "FLY_APP_NAME": self.standin.app,
            "VTP_WORKER_IMAGE": "registry.fly.io/vtp:test",
            "VTP_FLY_GUESTS": "performance-8x",
            "VTP_CONTROLLER_INTERVAL": "0.3",
            "VTP_IDLE_EXIT": "2",
            "VTP_BOOT_GRACE": "90",
            **controller_env,
        }
        self.controller: subprocess.Popen | None = None
        self.peak = 0

    def start(self) -> None:
        self.cluster.start_worker("cpu", "cpu-1", concurrency=2)
        self.cluster.wait_ready(("cpu-1", "cpu"))
        with self.log.open("ab") as out:
            self.controller = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "controller", "--backend", "fly"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )

    def logs(self) -> str:
        return f"---- controller ----\n{self.log.read_text()[-6000:]}\n{self.standin.logs()}\n{self.cluster.logs()}"

    def watch(self) -> int:
        running = len(self.standin.running())
        self.peak = max(self.peak, running)
        return running

    def close(self) -> None:
        if self.controller and self.controller.poll() is None:
            self.controller.send_signal(signal.SIGTERM)
            try:
                self.controller.wait(10)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait(10)
        self.standin.close()
        self.cluster.close()


@pytest.fixture
def make_fleet(redis_url, tmp_path):
    fleets: list[Fleet] = []

    def make(**env: str) -> Fleet:
        fleet = Fleet(redis_url, tmp_path, **env)
        fleets.append(fleet)
        return fleet

    yield make
    for f in fleets:
        f.close()


async def finish(fleet: Fleet, store: JobStore, job_ids: list[str], timeout: float) -> dict:
    records = {}
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        while True:
            fleet.watch()
            record = await store.get(job_id)
            if record.terminal:
                records[job_id] = record
                break
            if time.monotonic() > deadline or fleet.controller.poll() is not None:
                raise AssertionError(f"job {job_id} is {record.state}\n{fleet.logs()}")
            await anyio.sleep(0.1)
    return records


async def all_stopped(fleet: Fleet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while fleet.watch():
        if time.monotonic() > deadline:
            raise AssertionError(f"machines still running: {[m.id for m in fleet.standin.running()]}\n{fleet.logs()}")
        await anyio.sleep(0.1)


async def test_burst_starts_machines_that_drain_and_stop(make_fleet, redis_url, data_dir):
    fleet = make_fleet(VTP_MAX_MACHINES="2", VTP_DRAIN_TARGET="1")
    # the API misbehaves now and then, as a real one does: a rate limit and a server error
    fleet.standin.inject(429, 1, action="create", retry_after=0.5)
    fleet.standin.inject(503, 2, action="list")
    fleet.start()
    ids = fleet.cluster.submit(data_dir / "jfk.flac", data_dir / "ivr_prompts.mp4", data_dir / "talk_tts.mp4")
    store = JobStore.open(redis_url)
    try:
        records = await finish(fleet, store, ids, timeout=150)
        assert {r.state for r in records.values()} == {"done"}, fleet.logs()
        await all_stopped(fleet, timeout=30)
        # the controller saw them stopped (its log says so), and is still there for the next burst
        deadline = time.monotonic() + 10
        while "0 queued (0 s audio), 0 in progress (0 orphaned); 0 up, 0 busy -> target 0" not in fleet.log.read_text().split("created machine")[-1]:
            assert time.monotonic() < deadline, fleet.logs()
            await anyio.sleep(0.2)
        assert fleet.controller.poll() is None, fleet.logs()
        client = redis_sync.Redis.from_url(redis_url)
        assert client.zcard(constants.QUEUE_GPU) == 0 and client.zcard(constants.QUEUE_CPU) == 0
        client.close()
        machines = list(fleet.standin.machines.values())
        assert fleet.peak <= 2 and len(machines) == 2, fleet.logs()  # the cap, reached
        assert {429, 503} <= {status for _, _, status in fleet.standin.requests}
        assert all(m.state == "stopped" and m.exits and set(m.exits) == {0} for m in machines), fleet.logs()
        # the workers ran with the env the controller gave them, and charged their machine time
        for r in records.values():
            assert r.machine_seconds.get("transcribe", 0) > 0 and r.machine_seconds.get("extract", 0) > 0
            assert r.cost_usd > 0
        status = fleet.cluster.cli("status", ids[0])
        assert "per audio hour; managed STT $0.18-$2.16" in status.stdout, status.stdout
        # the next burst reuses the stopped machines (warm pool) instead of creating more
        more = fleet.cluster.submit(data_dir / "jfk.flac", extra=("--no-reuse",))
        again = await finish(fleet, store, more, timeout=90)
        assert again[more[0]].state == "done"
        assert len(fleet.standin.machines) == len(machines), fleet.logs()
        await all_stopped(fleet, timeout=30)
    finally:
        await store.aclose()


async def test_worker_killed_mid_batch_is_replaced_and_the_job_finishes(make_fleet, redis_url, data_dir):
    # Each batch sleeps 3 s inside the stage (test-only hook, handed to the machines by the
    # controller), so the kill lands mid-batch; the lease of a dead GPU worker's batch is the
    # transcribe timeout + 11 s.
    fleet = make_fleet(VTP_MAX_MACHINES="1", VTP_TEST_STAGE_DELAY="transcribe:3", VTP_TRANSCRIBE_TIMEOUT="8")
    fleet.start()
    (job_id,) = fleet.cluster.submit(data_dir / "jfk.flac")
    client = redis_sync.Redis.from_url(redis_url)
    store = JobStore.open(redis_url)
    try:
        deadline = time.monotonic() + 90
        while not client.keys(constants.ARQ_IN_PROGRESS_PREFIX + f"{job_id}:transcribe:*"):
            assert time.monotonic() < deadline, fleet.logs()
            await anyio.sleep(0.05)
        (victim,) = fleet.standin.running()
        fleet.standin.kill(victim.id)
        records = await finish(fleet, store, [job_id], timeout=120)
        assert records[job_id].state == "done", fleet.logs()
        assert -signal.SIGKILL in victim.exits
        boots = sum(1 for m in fleet.standin.machines.values() for e in m.events if e["type"] == "started")
        assert boots >= 2, fleet.logs()
        await all_stopped(fleet, timeout=30)
        assert fleet.controller.poll() is None
    finally:
        client.close()
        await store.aclose()


async def test_a_busy_worker_that_misses_its_health_reads_keeps_its_machine(make_fleet, redis_url, data_dir):
    """The worker on the machine stops answering for 8 s in the middle of a batch (SIGSTOP: what
    a slow poll, a blip or a Redis restart looks like to the controller): its health key expires,
    the machine has been up for longer than the boot grace, and yet it is not destroyed. Its
    worker still holds the batch's lease, and a worker once seen alive is lost only after
    VTP_LOST_GRACE without a sighting. The batch finishes on the same machine."""
    fleet = make_fleet(
        VTP_MAX_MACHINES="1", VTP_BOOT_GRACE="12", VTP_LEASE="30",
        VTP_TEST_STAGE_DELAY="transcribe:25", VTP_TRANSCRIBE_TIMEOUT="60",
    )
    fleet.start()
    (job_id,) = fleet.cluster.submit(data_dir / "jfk.flac")
    client = redis_sync.Redis.from_url(redis_url)
    store = JobStore.open(redis_url)
    try:
        deadline = time.monotonic() + 90
        while not client.keys(constants.ARQ_IN_PROGRESS_PREFIX + f"{job_id}:transcribe:*"):
            assert time.monotonic() < deadline, fleet.logs()
            await anyio.sleep(0.05)
        (machine,) = fleet.standin.running()
        born = datetime.fromisoformat(machine.created_at.replace("Z", "+00:00")).timestamp()
        await anyio.sleep(max(0.0, born + 13 - time.time()))  # past the boot grace
        health = constants.health_key("gpu", machine.name)
        machine.proc.send_signal(signal.SIGSTOP)
        try:
            await anyio.sleep(8)  # the health key (TTL 6 s) is gone meanwhile
            assert not client.exists(health)
        finally:
            machine.proc.send_signal(signal.SIGCONT)
        records = await finish(fleet, store, [job_id], timeout=90)
        assert records[job_id].state == "done", fleet.logs()
        destroyed = [r for r in fleet.standin.requests if r[0] == "DELETE"]
        assert destroyed == [] and machine.state != "destroyed", fleet.logs()
        assert len(fleet.standin.machines) == 1 and -signal.SIGKILL not in machine.exits, fleet.logs()
        await all_stopped(fleet, timeout=30)
    finally:
        client.close()
        await store.aclose()
