"""Fly Machines API: a small client on aiohttp (no SDK) and the controller's Fly backend.

The API (fly.io/docs/machines/api): ``GET/POST /v1/apps/{app}/machines`` (list, create),
``GET/DELETE /v1/apps/{app}/machines/{id}`` (get, destroy; ``?force=true`` for a running one),
``POST .../{id}/start``, ``POST .../{id}/stop``, ``GET .../{id}/wait?state=&timeout=&instance_id=``
(200 once the state is reached, **408** when ``timeout`` seconds pass first; waiting for
``stopped`` needs the ``instance_id``). Machines go ``created -> starting -> started ->
stopping -> stopped -> destroying -> destroyed`` (or ``failed``); with restart policy ``no`` a
machine whose main process exits is ``stopped``, which is how an idle worker stops its machine.

What can go wrong, and what this module does about it:

* **429**: the API allows about 1 request/s per action per machine (burst 3). Requests of one
  action on one machine are spaced ``pace_s`` apart here, and a 429 waits ``Retry-After``.
* **5xx / connection errors**: retried with exponential backoff and full jitter, then ``FleetError``.
* **401/403**: ``FleetAuthError`` naming the token and the app; the controller exits non-zero.
* **No capacity** (a create or start refused with a 4xx, or a machine that ends ``failed``):
  ``NoCapacity``; the backend tries the next region / machine kind of ``VTP_FLY_REGIONS`` x
  ``VTP_FLY_GUESTS`` and sets the failing one aside for a while.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from app import backoff, errors
from app.config import Settings
from app.retry_after import retry_after_seconds
from workers.controller.decide import Machine, Plan
from workers.controller.queue import Health

log = logging.getLogger("vtp.controller")

#: Fly GPU kinds (``guest.gpu_kind``); anything else names a CPU size such as ``performance-8x``.
GPU_KINDS = frozenset({"a100-40gb", "a100-80gb", "l40s", "a10"})
#: Metadata that marks the machines this controller owns (the web app's machines have none).
ROLE_KEY, ROLE = "vtp_role", "gpu-worker"
#: Metadata holding ``fingerprint`` of the machine's config.
CONFIG_KEY = "vtp_config"


class MachinesClient:
    """The Machines API of one app. Every method returns the decoded JSON answer."""

    def __init__(
        self,
        base_url: str,
        token: str,
        app: str,
        *,
        pace_s: float = 1.0,
        tries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        request_timeout_s: float = 90.0,
    ) -> None:
        if not token:
            raise errors.FleetAuthError("FLY_API_TOKEN is not set (create one with `fly tokens deploy`)")
        if not app:
            raise errors.OptionsError("FLY_APP_NAME is not set: the app whose machines the controller runs")
        self.base = base_url.rstrip("/") + f"/v1/apps/{app}/machines"
        self.app = app
        self.pace_s = pace_s
        self.tries = tries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=request_timeout_s),
        )
        self._last: dict[tuple[str, str], float] = {}
        #: Requests answered 429 / 5xx (tests and logs).
        self.throttled = 0
        self.server_errors = 0

    async def aclose(self) -> None:
        await self._session.close()

    # -- the endpoints --------------------------------------------------------------------------

    async def list(self, metadata: Mapping[str, str] | None = None) -> list[dict]:
        params = {f"metadata.{k}": v for k, v in (metadata or {}).items()}
        return await self._call("GET", "", action="list", params=params)

    async def get(self, machine_id: str) -> dict:
        return await self._call("GET", f"/{machine_id}", action="get", machine=machine_id)

    async def create(self, body: dict) -> dict:
        return await self._call("POST", "", action="create", json=body, capacity=True)

    async def start(self, machine_id: str) -> dict:
        return await self._call("POST", f"/{machine_id}/start", action="start", machine=machine_id, capacity=True)

    async def stop(self, machine_id: str, *, signal: str | None = None, timeout_s: int | None = None) -> dict:
        body: dict[str, Any] = {}
        if signal:
            body["signal"] = signal
        if timeout_s is not None:
            body["timeout"] = f"{timeout_s}s"
        return await self._call("POST", f"/{machine_id}/stop", action="stop", machine=machine_id, json=body)

    async def wait(self, machine_id: str, state: str, *, timeout_s: int = 60, instance_id: str | None = None) -> bool:
        """True once the machine is in ``state``; False if ``timeout_s`` passed first (the API's 408)."""
        params = {"state": state, "timeout": str(int(timeout_s))}
        if instance_id:
            params["instance_id"] = instance_id
        try:
            await self._call(
                "GET", f"/{machine_id}/wait", action="wait", machine=machine_id, params=params, timeout_s=timeout_s + 30, waiting=True
            )
        except _Timeout:
            return False
        return True

    async def destroy(self, machine_id: str, *, force: bool = False) -> dict:
        params = {"force": "true"} if force else None
        return await self._call("DELETE", f"/{machine_id}", action="destroy", machine=machine_id, params=params)

    # -- one request, with pacing and retries ---------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        action: str,
        machine: str = "",
        json: Any = None,
        params: Mapping[str, str] | None = None,
        capacity: bool = False,
        timeout_s: float | None = None,
        waiting: bool = False,
    ) -> Any:
        key = (action, machine)
        for attempt in range(1, self.tries + 1):
            wait = self._last.get(key, 0.0) + self.pace_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last[key] = time.monotonic()
            timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
            try:
                async with self._session.request(method, self.base + path, json=json, params=params, timeout=timeout) as resp:
                    status = resp.status
                    text = await resp.text()
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                status, text, retry_after = 0, f"{type(exc).__name__}: {exc}", None
            if 200 <= status < 300:
                return _json(text)
            reason = _reason(text)
            where = f"Fly Machines API {method} {path or '/'} of app {self.app}"
            if status in (401, 403):
                raise errors.FleetAuthError(f"{where}: the API rejected FLY_API_TOKEN ({status}: {reason})")
            if status == 408 and waiting:
                raise _Timeout(reason)
            if status == 429:
                self.throttled += 1
                asked = retry_after_seconds(retry_after)
                delay = self._backoff(attempt) if asked is None else asked
                log.warning("%s: rate limited (429), waiting %.1f s", where, delay)
                await asyncio.sleep(delay)
                continue
            if status == 0 or status >= 500:
                self.server_errors += 1
                if attempt == self.tries:
                    raise errors.FleetError(f"{where}: {status or 'no answer'}: {reason} (gave up after {attempt} tries)")
                delay = self._backoff(attempt)
                log.warning("%s: %s: %s; retrying in %.1f s", where, status or "no answer", reason, delay)
                await asyncio.sleep(delay)
                continue
            if status == 404:
                raise errors.FleetError(f"{where}: not found (404: {reason})")
            if capacity:
                raise errors.NoCapacity(f"{where}: {status}: {reason}")
            raise errors.FleetError(f"{where}: {status}: {reason}")
        raise errors.FleetError(f"Fly Machines API {method} {path or '/'}: still rate limited after {self.tries} tries")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return backoff.full_jitter(backoff.exponential(attempt, self.backoff_s, self.max_backoff_s))


class _Timeout(Exception):
    """The API answered 408: the wait's own timeout passed."""


def _json(text: str) -> Any:
    import json

    return json.loads(text) if text.strip() else {}


def _reason(text: str) -> str:
    try:
        body = _json(text)
    except ValueError:
        return " ".join(text.split())[:200] or "no details"
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])[:200]
    return " ".join(text.split())[:200] or "no details"


def _since(machine: dict) -> float:
    stamp = machine.get("updated_at") or machine.get("created_at") or ""
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def guest(kind: str) -> dict:
    """The ``guest`` of a machine kind: a Fly GPU, or a CPU size ``performance-8x`` / ``shared-cpu-4x``."""
    kind = kind.strip().lower()
    if kind in GPU_KINDS:
        return {"cpu_kind": "performance", "cpus": 8, "memory_mb": 32768, "gpu_kind": kind, "gpus": 1}
    family, _, size = kind.rpartition("-")
    if family not in ("performance", "shared-cpu") or not size.endswith("x") or not size[:-1].isdigit():
        raise errors.OptionsError(f"VTP_FLY_GUESTS: {kind!r} is neither a Fly GPU kind ({', '.join(sorted(GPU_KINDS))}) nor a size like performance-8x")
    cpus = int(size[:-1])
    if family == "performance":
        return {"cpu_kind": "performance", "cpus": cpus, "memory_mb": 2048 * cpus}
    return {"cpu_kind": "shared", "cpus": cpus, "memory_mb": 1024 * cpus}


def worker_command(name: str, idle_exit: float) -> list[str]:
    return ["vtp", "worker", "--queue", "gpu", "--idle-exit", f"{idle_exit:g}", "--name", name]


def machine_body(settings: Settings, kind: str, region: str, name: str) -> dict:
    """The create request of one worker machine."""
    if not settings.image:
        raise errors.OptionsError("no worker image: set VTP_WORKER_IMAGE (inside Fly, FLY_IMAGE_REF is used)")
    gpu = kind.strip().lower() in GPU_KINDS
    env = {
        **settings.worker_env(),
        "VTP_MACHINE_KIND": kind,
        # The engine runs where it is: CTranslate2 int8 on a CPU size, float16 on a GPU.
        "VTP_DEVICE": "cuda" if gpu else "cpu",
        "VTP_COMPUTE_TYPE": "float16" if gpu else "int8",
    }
    if settings.machine_price_hour > 0:
        env["VTP_MACHINE_PRICE_HOUR"] = f"{settings.machine_price_hour:g}"
    body: dict[str, Any] = {
        "name": name,
        "config": {
            "image": settings.image,
            "guest": guest(kind),
            "env": env,
            "init": {"cmd": worker_command(name, settings.fleet_idle_exit)},
            "restart": {"policy": "no"},
            # Kept when its worker exits: a stopped machine starts again in seconds (warm pool);
            # the controller destroys surplus ones.
            "auto_destroy": False,
            "metadata": {ROLE_KEY: ROLE},
        },
    }
    body["config"]["metadata"][CONFIG_KEY] = fingerprint(body["config"])
    if region:
        body["region"] = region
    return body


def fingerprint(config: dict) -> str:
    """What a stopped machine must match to be started again: image, guest, env and idle time
    (a machine from an older release or older settings is left to be destroyed instead)."""
    import hashlib
    import json

    cmd = list((config.get("init") or {}).get("cmd") or [])
    same = {
        "image": config.get("image"),
        "guest": config.get("guest"),
        "env": config.get("env"),
        "cmd": cmd[: cmd.index("--name")] if "--name" in cmd else cmd,
    }
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FlyBackend:
    """Runs worker machines in one Fly app through the Machines API."""

    settings: Settings
    client: MachinesClient
    #: Seconds a region / kind that failed is skipped.
    cooldown_s: float = 300.0
    #: Seconds to wait for a started machine to report ``started`` (408 is not an error: the
    #: next tick sees its state).
    start_wait_s: int = 20
    name: str = "fly"
    _bad: dict[tuple[str, str], float] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)
    _kinds: dict[str, tuple[str, str]] = field(default_factory=dict)
    created: int = 0
    started: int = 0
    destroyed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, **client_kw: Any) -> FlyBackend:
        for kind in _split(settings.fly_guests):
            guest(kind)  # a bad kind is an options error at start, not at the first burst
        client = MachinesClient(settings.fly_api_hostname, settings.fly_api_token, settings.fly_app_name, **client_kw)
        return cls(settings, client)

    async def aclose(self) -> None:
        await self.client.aclose()

    def candidates(self) -> list[tuple[str, str]]:
        kinds = _split(self.settings.fly_guests) or ["performance-8x"]
        regions = _split(self.settings.fly_regions) or [""]
        return [(k, r) for k in kinds for r in regions]

    async def machines(self, health: Mapping[str, Health]) -> list[Machine]:
        out = []
        for m in await self.client.list({ROLE_KEY: ROLE}):
            state = m.get("state", "")
            if state in ("destroyed", "destroying"):
                continue
            name = m.get("name", "")
            self._names[m["id"]] = name
            kind = ((m.get("config") or {}).get("env") or {}).get("VTP_MACHINE_KIND", "")
            # keyed like candidates(): by region only when regions are configured
            self._kinds[m["id"]] = (kind, m.get("region", "") if self.settings.fly_regions.strip() else "")
            h = health.get(name)
            alive = h is not None and h.alive and state in ("started", "starting")
            out.append(
                Machine(
                    id=m["id"],
                    state=state if state in _STATES else "starting",
                    since=_since(m),
                    alive=alive,
                    running=h.running if alive else 0,
                    restartable=state == "stopped" and self._current(m),
                    holding=h is not None and h.holding > 0,
                )
            )
        return out

    def _current(self, machine: dict) -> bool:
        """Was it created with this controller's image and settings (for its kind)?"""
        config = machine.get("config") or {}
        kind = (config.get("env") or {}).get("VTP_MACHINE_KIND", "")
        try:
            wanted = machine_body(self.settings, kind, "", "x")["config"]["metadata"][CONFIG_KEY]
        except errors.VtpError:
            return False
        return (config.get("metadata") or {}).get(CONFIG_KEY) == wanted

    async def apply(self, plan: Plan, machines: list[Machine]) -> None:
        by_id = {m.id: m for m in machines}
        for machine_id in plan.destroy:
            m = by_id.get(machine_id)
            if m is not None and m.keep:  # decide() never asks this; the backend refuses anyway
                continue
            if m is not None and m.state == "failed":
                self._set_aside(*self._kinds.get(machine_id, ("", "")))
            try:
                await self.client.destroy(machine_id, force=m is not None and m.state != "stopped")
                self.destroyed += 1
                log.info("destroyed machine %s (%s)", machine_id, m.state if m else "?")
            except errors.FleetAuthError:
                raise
            except errors.FleetError as exc:
                log.warning("could not destroy machine %s: %s", machine_id, exc)
        gone = set(plan.destroy)
        warm = sorted(
            (m for m in machines if m.state == "stopped" and m.restartable and m.id not in gone),
            key=lambda m: m.since, reverse=True,
        )
        brought_up = []
        for _ in range(plan.start):
            machine_id = await self._start_one(warm)
            if machine_id is None:
                break
            brought_up.append(machine_id)
        # Wait for them together: a tick is never held a start_wait_s per machine.
        await asyncio.gather(*(self._settle(i) for i in brought_up))

    async def _start_one(self, warm: list[Machine]) -> str | None:
        """Start a stopped machine, else create one; its id (None: nothing could start)."""
        now = time.monotonic()
        while warm:  # the warm pool first: a start is seconds, a create pulls the image
            m = warm.pop(0)
            kind, region = self._kinds.get(m.id, ("", ""))
            if self._bad.get((kind, region), 0.0) > now:
                continue
            try:
                await self.client.start(m.id)
            except errors.NoCapacity as exc:
                log.warning("machine %s did not start (%s); trying another", m.id, exc)
                self._set_aside(kind, region)
                continue
            self.started += 1
            log.info("started stopped machine %s (%s %s)", m.id, kind, region or "any region")
            return m.id
        for kind, region in self.candidates():
            if self._bad.get((kind, region), 0.0) > now:
                continue
            name = f"vtp-gpu-{secrets.token_hex(4)}"
            try:
                created = await self.client.create(machine_body(self.settings, kind, region, name))
            except errors.NoCapacity as exc:
                log.warning("no %s machine in %s: %s; trying the next", kind, region or "any region", exc)
                self._set_aside(kind, region)
                continue
            self.created += 1
            self._kinds[created["id"]] = (kind, region)
            log.info("created machine %s %s (%s in %s)", created["id"], name, kind, created.get("region", region))
            return created["id"]
        log.warning("no region / machine kind could start a machine now (all set aside for a while)")
        return None

    async def _settle(self, machine_id: str) -> None:
        """Wait (briefly) until it is started; one that ends ``failed`` sets its kind aside."""
        try:
            if await self.client.wait(machine_id, "started", timeout_s=self.start_wait_s):
                return
            m = await self.client.get(machine_id)
        except errors.FleetAuthError:
            raise
        except errors.FleetError as exc:
            log.warning("machine %s: %s", machine_id, exc)
            try:
                m = await self.client.get(machine_id)
            except errors.FleetError:
                return
        if m.get("state") == "failed":
            self._set_aside(*self._kinds.get(machine_id, ("", "")))

    def _set_aside(self, kind: str, region: str) -> None:
        self._bad[(kind, region)] = time.monotonic() + self.cooldown_s


_STATES = frozenset({"created", "starting", "started", "stopping", "stopped", "failed", "destroying", "destroyed"})


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
