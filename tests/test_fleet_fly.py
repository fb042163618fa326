"""The Fly Machines client and backend against the local Machines API stand-in (tests/support/fly_standin.py).

Here the stand-in's machines run a sleeping Python instead of a worker (no Redis needed);
tests/test_fleet_cluster.py runs real workers on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from app import errors
from app.config import Settings
from tests.support.fly_standin import ROOT, FlyStandin
from workers.controller.decide import Plan
from workers.controller.fly import FlyBackend, MachinesClient, guest, machine_body

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def standin(tmp_path):
    s = FlyStandin(work_dir=tmp_path, command=SLEEPER).start()
    yield s
    s.close()


def settings_for(standin: FlyStandin, **kw) -> Settings:
    env = {
        "FLY_API_HOSTNAME": standin.url,
        "FLY_API_TOKEN": standin.token,
        "FLY_APP_NAME": standin.app,
        "VTP_WORKER_IMAGE": "registry.fly.io/vtp:test",
        **kw,
    }
    return Settings.from_env(env)


def client_for(standin: FlyStandin, **kw) -> MachinesClient:
    return MachinesClient(standin.url, standin.token, standin.app, pace_s=0.0, backoff_s=0.05, **kw)


def body(name: str = "m1") -> dict:
    return {"name": name, "region": "ord", "config": {"image": "x", "restart": {"policy": "no"}, "metadata": {"vtp_role": "gpu-worker"}}}


async def test_machine_lifecycle_and_wait(standin):
    client = client_for(standin)
    try:
        m = await client.create(body())
        assert await client.wait(m["id"], "started", timeout_s=5)
        listed = await client.list({"vtp_role": "gpu-worker"})
        assert [x["id"] for x in listed] == [m["id"]] and listed[0]["state"] == "started"
        assert await client.list({"vtp_role": "web"}) == []
        # a wait that cannot be met answers 408: False, not an error
        started = time.monotonic()
        assert not await client.wait(m["id"], "stopped", timeout_s=1, instance_id=m["instance_id"])
        assert time.monotonic() - started >= 1
        await client.stop(m["id"])
        assert await client.wait(m["id"], "stopped", timeout_s=10, instance_id=m["instance_id"])
        assert (await client.start(m["id"]))["previous_state"] == "stopped"
        assert await client.wait(m["id"], "started", timeout_s=5)
        with pytest.raises(errors.FleetError, match="412"):
            await client.destroy(m["id"])  # running: refused without force
        await client.destroy(m["id"], force=True)
        assert await client.list() == []
        with pytest.raises(errors.FleetError, match="404"):
            await client.get(m["id"])
    finally:
        await client.aclose()


async def test_429_waits_retry_after(standin):
    client = client_for(standin)
    try:
        standin.inject(429, 2, action="list", retry_after=0.4)
        started = time.monotonic()
        assert await client.list() == []
        assert time.monotonic() - started >= 0.8
        assert client.throttled == 2
    finally:
        await client.aclose()


async def test_5xx_backoff_then_success_then_give_up(standin):
    client = client_for(standin, tries=4)
    try:
        standin.inject(503, 2, action="create")
        m = await client.create(body())
        assert m["state"] in ("starting", "started") and client.server_errors == 2
        standin.inject(500, 10, action="list")
        with pytest.raises(errors.FleetError, match="gave up after 4 tries"):
            await client.list()
    finally:
        await client.aclose()


async def test_rejected_token_is_a_clear_error(standin):
    client = MachinesClient(standin.url, "wrong", standin.app, pace_s=0)
    try:
        with pytest.raises(errors.FleetAuthError, match="rejected FLY_API_TOKEN"):
            await client.list()
    finally:
        await client.aclose()


def test_controller_exits_non_zero_on_a_rejected_token(standin, redis_url):
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url,
        "FLY_API_HOSTNAME": standin.url, "FLY_API_TOKEN": "revoked", "FLY_APP_NAME": standin.app,
        "VTP_WORKER_IMAGE": "x", "VTP_CONTROLLER_INTERVAL": "0.2",
    }
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "controller", "--backend", "fly"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 1
    assert "rejected FLY_API_TOKEN (401" in res.stderr and "Traceback" not in res.stderr


def test_guest_and_body():
    assert guest("a100-40gb")["gpu_kind"] == "a100-40gb"
    assert guest("performance-8x") == {"cpu_kind": "performance", "cpus": 8, "memory_mb": 16384}
    assert guest("shared-cpu-4x")["cpu_kind"] == "shared"
    with pytest.raises(errors.OptionsError):
        guest("h100")
    s = Settings.from_env({"VTP_WORKER_IMAGE": "img", "REDIS_URL": "redis://r:6379/0", "VTP_IDLE_EXIT": "30", "FLY_API_TOKEN": "secret"})
    b = machine_body(s, "l40s", "ord", "vtp-gpu-1")
    c = b["config"]
    assert b["region"] == "ord" and c["image"] == "img" and c["restart"] == {"policy": "no"} and c["auto_destroy"] is False
    assert c["init"]["cmd"] == ["vtp", "worker", "--queue", "gpu", "--idle-exit", "30", "--name", "vtp-gpu-1"]
    assert c["env"]["VTP_MACHINE_KIND"] == "l40s" and c["env"]["VTP_DEVICE"] == "cuda"
    assert "REDIS_URL" not in c["env"]  # an app secret: every machine of the app has it
    assert "secret" not in repr(b)  # the token never travels to a worker
    assert machine_body(s, "performance-8x", "", "w")["config"]["env"]["VTP_COMPUTE_TYPE"] == "int8"


async def test_backend_falls_back_to_the_next_region_and_kind(standin):
    s = settings_for(standin, VTP_FLY_GUESTS="a100-40gb,performance-8x", VTP_FLY_REGIONS="ord,iad")
    standin.no_capacity |= {("ord", "a100-40gb"), ("iad", "a100-40gb")}
    backend = FlyBackend.from_settings(s, pace_s=0.0)
    try:
        await backend.apply(Plan(start=1), [])
        (m,) = standin.machines.values()
        assert (m.region, m.kind, m.state) == ("ord", "performance-8x", "started")
        # the failed candidates are set aside: the next start goes straight to a working one
        n = len(standin.requests)
        await backend.apply(Plan(start=1), [])
        assert [r for r in standin.requests[n:] if r[0] == "POST"] == [("POST", f"/v1/apps/{standin.app}/machines", 200)]
    finally:
        await backend.aclose()


async def test_backend_starts_stopped_machines_first_and_destroys_surplus(standin):
    s = settings_for(standin)
    backend = FlyBackend.from_settings(s, pace_s=0.0)
    try:
        await backend.apply(Plan(start=2), [])
        assert backend.created == 2
        for m in standin.machines.values():
            standin.kill(m.id)
        deadline = time.monotonic() + 10
        while any(m.state != "stopped" for m in standin.machines.values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        machines = await backend.machines({})
        assert {m.state for m in machines} == {"stopped"} and all(m.restartable for m in machines)
        await backend.apply(Plan(start=1), machines)
        assert backend.created == 2 and backend.started == 1
        assert sorted(m.state for m in standin.machines.values()) == ["started", "stopped"]
        stopped = next(m.id for m in machines if standin.machines[m.id].state == "stopped")
        await backend.apply(Plan(destroy=(stopped,)), await backend.machines({}))
        assert standin.machines[stopped].state == "destroyed"
    finally:
        await backend.aclose()


async def test_a_machine_that_fails_to_start_sets_its_kind_aside(standin):
    s = settings_for(standin, VTP_FLY_GUESTS="l40s,performance-8x")
    standin.fail_starts = 1
    backend = FlyBackend.from_settings(s, pace_s=0.0)
    try:
        await backend.apply(Plan(start=1), [])
        (failed,) = standin.machines.values()
        assert failed.state == "failed" and failed.kind == "l40s"
        machines = await backend.machines({})
        await backend.apply(Plan(start=1, destroy=(failed.id,)), machines)
        kinds = {m.kind: m.state for m in standin.machines.values()}
        assert kinds == {"l40s": "destroyed", "performance-8x": "started"}
    finally:
        await backend.aclose()


async def test_408_outside_wait_is_an_error(standin):
    client = client_for(standin)
    try:
        standin.inject(408, 1, action="list")
        with pytest.raises(errors.FleetError, match="408"):
            await client.list()
    finally:
        await client.aclose()


async def test_stopped_machines_of_an_older_release_are_not_restarted(standin):
    old = FlyBackend.from_settings(settings_for(standin, VTP_WORKER_IMAGE="registry.fly.io/vtp:v1"), pace_s=0.0)
    new = FlyBackend.from_settings(settings_for(standin, VTP_WORKER_IMAGE="registry.fly.io/vtp:v2"), pace_s=0.0)
    try:
        await old.apply(Plan(start=1), [])
        (m,) = standin.machines.values()
        standin.kill(m.id)
        deadline = time.monotonic() + 10
        while m.state != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [x.restartable for x in await old.machines({})] == [True]
        listed = await new.machines({})
        assert [x.restartable for x in listed] == [False]  # decide() destroys it after the grace period
        await new.apply(Plan(start=1), listed)
        assert new.created == 1 and new.started == 0
    finally:
        await old.aclose()
        await new.aclose()


#: Every secret a controller may hold, with values that cannot occur by chance.
SECRETS = {
    "REDIS_URL": "rediss://default:redis-pw-5f1c9e@redis.example:6379/0",
    "VTP_API_TOKENS": "api-token-a8d2e4,api-token-b7c1f0",
    "VTP_WEBHOOK_SECRET": "whsec_" + "d2ViaG9vay1zZWNyZXQtdmFsdWUtMzJieXRlcyEhIQ==",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-9e3b7d",
}


async def test_no_secret_reaches_a_machine_config(standin):
    """The create request (what the Machines API shows anyone who may read the app) carries the
    allow-listed settings and no secret: REDIS_URL, the tokens, the webhook key and the Fly token
    reach the machine only as app secrets, which the stand-in, like Fly, puts into its env."""
    s = settings_for(standin, **SECRETS, VTP_BATCH_SIZE="4", VTP_MAX_UPLOAD_MB="5", VTP_GPU_JOBS="2")
    backend = FlyBackend.from_settings(s, pace_s=0.0)
    try:
        await backend.apply(Plan(start=1), [])
    finally:
        await backend.aclose()
    (body,) = standin.created_bodies
    text = json.dumps(body)
    for value in [*s.secret_values(), SECRETS["AWS_SECRET_ACCESS_KEY"], "redis-pw-5f1c9e", "api-token-a8d2e4"]:
        assert value not in text, value
    env = body["config"]["env"]
    assert env["VTP_BATCH_SIZE"] == "4" and env["VTP_GPU_JOBS"] == "2"
    # not for workers: the web process's limit, the controller's own settings
    assert not {"VTP_MAX_UPLOAD_MB", "VTP_MAX_MACHINES", "FLY_API_HOSTNAME", "VTP_WORKER_IMAGE"} & set(env)
    assert set(env) <= {Settings.env_var(f) for f in Settings.for_workers()} | {"VTP_MACHINE_KIND", "VTP_MACHINE_PRICE_HOUR"}
