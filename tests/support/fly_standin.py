"""Test helper (not a test module): a local HTTP stand-in for the Fly Machines API.

**A stand-in, because the cloud is unreachable from here**: it is the one allowed in this
project. It speaks the documented Machines API (fly.io/docs/machines/api/machines-resource)
for what the controller uses:

    GET    /v1/apps/{app}/machines[?include_deleted=&region=&metadata.KEY=VALUE]   list
    POST   /v1/apps/{app}/machines                                               create
    GET    /v1/apps/{app}/machines/{id}                                          get
    POST   /v1/apps/{app}/machines/{id}/start                                    start
    POST   /v1/apps/{app}/machines/{id}/stop      {"signal", "timeout"}           stop
    GET    /v1/apps/{app}/machines/{id}/wait?state=&timeout=&instance_id=         wait (408 on timeout)
    DELETE /v1/apps/{app}/machines/{id}[?force=true]                              destroy

with ``Authorization: Bearer <token>`` (401 otherwise) and the documented states:
``created -> starting -> started -> stopping -> stopped -> destroying -> destroyed``, or
``failed``. Waiting for ``stopped`` needs the ``instance_id``, as documented.

**Machines run real processes**: starting a machine runs its ``config.init.cmd`` (``vtp ...``
mapped to ``python -m app.cli ...`` of this checkout) with exactly the ``config.env`` the
controller gave it; when that process exits the machine becomes ``stopped`` (restart policy
``no``) or is destroyed (``auto_destroy``), as on Fly. Stop sends SIGINT (or the signal asked
for), then SIGKILL after the timeout.

**Injectable failures**: ``inject(status, count, action=, retry_after=)`` answers the next
``count`` requests of ``action`` with that status (429 with ``Retry-After``, 5xx);
``no_capacity.add((region, kind))`` refuses creates and starts there with Fly's 412;
``fail_starts`` makes the next N machine boots end ``failed``.

**App secrets**: ``app_secrets`` go into every machine's environment at boot, beside its
``config.env``, as Fly does with ``fly secrets set`` values (fly.io/docs/apps/secrets: "available
as environment variables on every Machine belonging to that Fly App, whether the Machine is part
of Fly Launch or not"); ``created_bodies`` keeps what each create request carried.

The server runs on its own event loop in a thread, bound to 127.0.0.1; ``close()`` kills every
machine process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
GPU_KINDS = {"a100-40gb", "a100-80gb", "l40s", "a10"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class StandinMachine:
    id: str
    name: str
    region: str
    config: dict
    state: str = "created"
    instance_id: str = field(default_factory=lambda: secrets.token_hex(13).upper())
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    events: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    exits: list = field(default_factory=list)

    def set_state(self, state: str, source: str = "flyd") -> None:
        self.state = state
        self.updated_at = _now()
        self.events.insert(0, {"type": state, "status": state, "source": source, "timestamp": int(time.time() * 1000)})

    def view(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": "fdaa:0:1:a7b:1::2",
            "config": self.config,
            "image_ref": {"registry": "registry.fly.io", "repository": self.config.get("image", "")},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "events": self.events[:10],
        }

    @property
    def kind(self) -> str:
        g = self.config.get("guest") or {}
        return g.get("gpu_kind") or f"{g.get('cpu_kind', 'shared')}-{g.get('cpus', 1)}x".replace("shared-", "shared-cpu-")


class FlyStandin:
    def __init__(
        self, *, token: str = "test-token", app: str = "vtp-test", work_dir: Path, app_secrets: dict | None = None,
        command: list[str] | None = None,
    ):
        """``app_secrets`` are the app's secrets (``fly secrets set``): as on Fly, every machine of the
        app gets them in its environment at boot, whoever created it, and they never appear in
        a machine's config. ``command`` replaces every machine's own command (client tests that
        need no worker)."""
        self.command = command
        self.token = token
        self.app = app
        self.work_dir = work_dir
        self.app_secrets = dict(app_secrets or {})
        #: Every create request's body, as the API received it.
        self.created_bodies: list[dict] = []
        self.machines: dict[str, StandinMachine] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.no_capacity: set[tuple[str, str]] = set()
        self.fail_starts = 0
        self._injected: list[dict] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> FlyStandin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        base = "/v1/apps/{app}/machines"
        app.router.add_get(base, self._list)
        app.router.add_post(base, self._create)
        app.router.add_get(base + "/{id}", self._get)
        app.router.add_delete(base + "/{id}", self._destroy)
        app.router.add_post(base + "/{id}/start", self._start)
        app.router.add_post(base + "/{id}/stop", self._stop)
        app.router.add_get(base + "/{id}/wait", self._wait)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the bound port
        self._loop.create_task(self._reap())

    def close(self) -> None:
        for m in list(self.machines.values()):
            if m.proc and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(10)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- what tests use -----------------------------------------------------------------------

    def inject(self, status: int, count: int = 1, *, action: str = "", retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests of ``action`` ("" = any) with ``status``."""
        with self._lock:
            self._injected.append({"status": status, "count": count, "action": action, "retry_after": retry_after})

    def running(self) -> list[StandinMachine]:
        return [m for m in self.machines.values() if m.state in ("starting", "started", "stopping")]

    def kill(self, machine_id: str, sig: int = signal.SIGKILL) -> None:
        """What an OOM kill or a host failure does to the machine's process."""
        m = self.machines[machine_id]
        if m.proc and m.proc.poll() is None:
            m.proc.send_signal(sig)

    def logs(self) -> str:
        parts = []
        for m in self.machines.values():
            text = m.log.read_text(errors="replace")[-4000:] if m.log and m.log.exists() else ""
            parts.append(f"---- machine {m.id} {m.name} ({m.state}) ----\n{text}")
        return "\n".join(parts)

    # -- HTTP ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        action = _action(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.requests.append((request.method, request.path, 401))
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.match_info.get("app") != self.app:
            return web.json_response({"error": "app not found"}, status=404)
        with self._lock:
            for inj in self._injected:
                if inj["count"] > 0 and inj["action"] in ("", action):
                    inj["count"] -= 1
                    self.requests.append((request.method, request.path, inj["status"]))
                    headers = {}
                    if inj["retry_after"] is not None:
                        headers["Retry-After"] = f"{inj['retry_after']:g}"
                    body = {"error": "rate limit exceeded" if inj["status"] == 429 else "internal error"}
                    return web.json_response(body, status=inj["status"], headers=headers)
        response = await handler(request)
        self.requests.append((request.method, request.path, response.status))
        return response

    def _machine(self, request: web.Request) -> StandinMachine:
        m = self.machines.get(request.match_info["id"])
        if m is None or m.state == "destroyed":
            raise web.HTTPNotFound(text='{"error": "machine not found"}', content_type="application/json")
        return m

    async def _list(self, request: web.Request) -> web.Response:
        include_deleted = request.query.get("include_deleted") == "true"
        out = []
        for m in self.machines.values():
            if m.state == "destroyed" and not include_deleted:
                continue
            if "region" in request.query and m.region != request.query["region"]:
                continue
            meta = m.config.get("metadata") or {}
            if any(meta.get(k[len("metadata."):]) != v for k, v in request.query.items() if k.startswith("metadata.")):
                continue
            out.append(m.view())
        return web.json_response(out)

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._machine(request).view())

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.created_bodies.append(body)
        config = body.get("config") or {}
        if not config.get("image"):
            return web.json_response({"error": "invalid config: image is required"}, status=400)
        region = body.get("region") or "ord"
        machine = StandinMachine(
            id=secrets.token_hex(7), name=body.get("name") or f"machine-{secrets.token_hex(3)}", region=region, config=config
        )
        if (region, machine.kind) in self.no_capacity:
            return web.json_response(
                {"error": "could not reserve resource for machine: insufficient resources available to fulfill request"},
                status=412,
            )
        self.machines[machine.id] = machine
        machine.set_state("created", "user")
        if not body.get("skip_launch"):
            self._boot(machine)
        return web.json_response(machine.view())

    async def _start(self, request: web.Request) -> web.Response:
        m = self._machine(request)
        previous = m.state
        if m.state not in ("created", "stopped", "failed"):
            return web.json_response({"error": f"failed_precondition: machine is {m.state}, unable to start"}, status=412)
        if (m.region, m.kind) in self.no_capacity:
            return web.json_response({"error": "insufficient resources available to fulfill request"}, status=412)
        m.instance_id = secrets.token_hex(13).upper()
        self._boot(m)
        return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def _stop(self, request: web.Request) -> web.Response:
        m = self._machine(request)
        body = await request.json() if request.can_read_body else {}
        if m.state not in ("started", "starting"):
            return web.json_response({"ok": True})
        sig = getattr(signal, (body or {}).get("signal") or "SIGINT", signal.SIGINT)
        timeout = float(str((body or {}).get("timeout") or "5").rstrip("s") or 5)
        m.set_state("stopping", "user")
        if m.proc and m.proc.poll() is None:
            m.proc.send_signal(sig)
            self._loop.call_later(timeout, lambda p=m.proc: p.poll() is None and p.kill())
        return web.json_response({"ok": True})

    async def _wait(self, request: web.Request) -> web.Response:
        m = self._machine(request)
        state = request.query.get("state", "started")
        if state not in ("started", "stopped", "suspended", "destroyed"):
            return web.json_response({"error": f"invalid state {state!r}"}, status=400)
        if state == "stopped" and not request.query.get("instance_id"):
            return web.json_response({"error": "instance_id is required to wait for the stopped state"}, status=400)
        timeout = float(request.query.get("timeout", "60"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.state == state:
                return web.json_response({"ok": True})
            if state == "started" and m.state in ("failed", "destroyed"):
                return web.json_response({"error": f"machine is {m.state}"}, status=400)
            await asyncio.sleep(0.05)
        return web.json_response({"error": f"deadline_exceeded: machine did not reach {state} in {timeout:g}s"}, status=408)

    async def _destroy(self, request: web.Request) -> web.Response:
        m = self._machine(request)
        force = request.query.get("force") == "true"
        if m.state in ("started", "starting", "stopping") and not force:
            return web.json_response({"error": "failed_precondition: machine still active, refusing to destroy"}, status=412)
        m.set_state("destroying", "user")
        if m.proc and m.proc.poll() is None:
            m.proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, m.proc.wait)
        m.set_state("destroyed", "user")
        return web.json_response({"ok": True})

    # -- machines' processes ------------------------------------------------------------------

    def _boot(self, m: StandinMachine) -> None:
        m.set_state("starting")
        if self.fail_starts > 0:
            self.fail_starts -= 1
            m.set_state("failed")
            return
        init = m.config.get("init") or {}
        cmd = list(self.command or init.get("exec") or init.get("cmd") or [])
        if cmd and cmd[0] == "vtp":  # the image's entry point, as this checkout runs it
            cmd = [sys.executable, "-m", "app.cli", *cmd[1:]]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.work_dir),
            "PYTHONPATH": str(ROOT),
            "FLY_MACHINE_ID": m.id,
            "FLY_APP_NAME": self.app,
            "FLY_REGION": m.region,
            **self.app_secrets,
            **(m.config.get("env") or {}),
        }
        m.log = self.work_dir / f"machine-{m.id}.log"
        with m.log.open("ab") as out:
            m.proc = subprocess.Popen(cmd or ["true"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        m.set_state("started")

    async def _reap(self) -> None:
        """A machine whose main process exited is stopped (restart policy no), or destroyed."""
        while True:
            for m in list(self.machines.values()):
                if m.proc is not None and m.state in ("started", "stopping") and m.proc.poll() is not None:
                    m.exits.append(m.proc.returncode)
                    m.proc = None
                    if m.config.get("auto_destroy"):
                        m.set_state("destroyed")
                    else:
                        m.set_state("stopped")
            await asyncio.sleep(0.05)


def _action(request: web.Request) -> str:
    path = request.path.rstrip("/")
    last = path.rsplit("/", 1)[-1]
    if last in ("start", "stop", "wait"):
        return last
    if last == "machines":
        return "list" if request.method == "GET" else "create"
    return {"GET": "get", "DELETE": "destroy"}.get(request.method, "update")
