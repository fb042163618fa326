"""The control loop: look at the queue and the machines, decide, act; every few seconds.

A Redis outage or a failing cloud API costs ticks, never the controller: it logs and looks
again. Only a rejected token (``FleetAuthError``) or bad options end it, with a one-line
reason and a non-zero exit (``vtp controller``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import anyio
from redis import exceptions as redis_errors

from app import errors
from app.config import Settings
from app.redis_outage import connect
from workers.controller.decide import UP, Machine, Plan, Policy, decide
from workers.controller.queue import Health, read_queue, read_workers

log = logging.getLogger("vtp.controller")


class Backend(Protocol):
    name: str

    async def machines(self, health: dict[str, Health]) -> list[Machine]: ...

    async def apply(self, plan: Plan, machines: list[Machine]) -> None: ...

    async def aclose(self) -> None: ...


class ReportOnly:
    """``--backend keda``: start nothing; only publish the figure (``--port``) for a KEDA ScaledJob,
    which creates the worker Jobs itself (deploy/k8s/keda/)."""

    name = "keda"

    async def machines(self, health: dict[str, Health]) -> list[Machine]:
        return []  # so the plan's `start` is the machines the waiting work needs, beyond busy ones

    async def apply(self, plan: Plan, machines: list[Machine]) -> None:
        return None

    async def aclose(self) -> None:
        return None


@dataclass
class Figures:
    """The last look, served as JSON by ``vtp controller --port`` (KEDA's metrics-api scaler)."""

    queued: int = 0
    queued_audio_s: float = 0.0
    in_progress: int = 0
    #: Machines that should run now (busy ones included).
    target: int = 0
    #: Machines to add for the waiting work: what a KEDA ScaledJob should create.
    wanted: int = 0
    at: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sightings:
    """When each machine's worker was last seen alive: the controller's memory between ticks.

    ``decide`` measures a lost worker from its last sighting, not from the machine's start. A
    machine this controller has never seen alive but finds past its boot grace (the controller
    restarted) counts as seen at the first look: it gets ``VTP_LOST_GRACE`` from then, not
    destruction on one missed health read.
    """

    last: dict[str, float] = field(default_factory=dict)
    #: Machines listed before (the first look at a machine is the only one that may seed ``last``).
    known: set[str] = field(default_factory=set)

    def observe(self, machines: list[Machine], policy: Policy, now: float) -> list[Machine]:
        out = []
        for m in machines:
            first = m.id not in self.known
            self.known.add(m.id)
            if m.alive or (first and m.state in UP and now - m.since > policy.boot_grace_s):
                self.last[m.id] = now
            out.append(replace(m, seen=self.last.get(m.id)))
        listed = {m.id for m in machines}
        self.known &= listed
        for gone in [i for i in self.last if i not in listed]:
            del self.last[gone]
        return out


def policy_from(settings: Settings, *, slots: int = 1) -> Policy:
    return Policy(
        max_machines=settings.max_machines,
        drain_target_s=settings.drain_target,
        throughput=settings.machine_throughput,
        slots=slots,
        warm_pool=settings.warm_pool,
        stopped_grace_s=settings.stopped_grace,
        boot_grace_s=settings.boot_grace,
        lost_grace_s=settings.lost_grace,
    )


def open_backend(name: str, settings: Settings) -> Backend:
    if name == "fly":
        from workers.controller.fly import FlyBackend

        return FlyBackend.from_settings(settings)
    if name == "keda":
        return ReportOnly()
    if name == "kubernetes":
        from workers.controller.kube import KubernetesBackend

        return KubernetesBackend.from_settings(settings)
    raise errors.OptionsError(f"unknown backend {name!r}: use fly or kubernetes")


async def tick(
    backend: Backend, redis, policy: Policy, figures: Figures | None = None, sightings: Sightings | None = None
) -> Plan:
    queue = await read_queue(redis)
    health = await read_workers(redis)
    # held by live workers, and by workers whose health key is missing but which renew a lease
    queue = replace(queue, held=sum(h.running if h.alive else h.holding for h in health.values()))
    now = time.time()
    machines = (sightings or Sightings()).observe(await backend.machines(health), policy, now)
    plan = decide(queue, machines, policy, now)
    if figures is not None:
        figures.__dict__.update(
            queued=queue.queued, queued_audio_s=queue.queued_audio_s, in_progress=queue.in_progress,
            target=plan.target, wanted=plan.start, at=round(time.time(), 3),
        )
    if plan.start or plan.destroy:
        log.info("%s: start %d, destroy %s", plan.reason, plan.start, ", ".join(plan.destroy) or "none")
    await backend.apply(plan, machines)
    return plan


async def run_controller(
    backend: Backend, settings: Settings, *, ticks: int | None = None, figures: Figures | None = None
) -> None:
    """Run until cancelled (or for ``ticks`` looks, for tests)."""
    redis = connect(settings.redis_url, retries=1)
    policy = policy_from(settings)
    log.info(
        "controller (%s): at most %d machines, drain target %g s at %g audio s/s per machine",
        backend.name, policy.max_machines, policy.drain_target_s, policy.throughput,
    )
    last = ""
    n = 0
    sightings = Sightings()
    try:
        while ticks is None or n < ticks:
            n += 1
            try:
                plan = await tick(backend, redis, policy, figures, sightings)
                if plan.reason != last and not (plan.start or plan.destroy):  # tick() logged those
                    log.info("%s", plan.reason)
                last = plan.reason
            except (errors.FleetAuthError, errors.OptionsError):
                raise
            except (redis_errors.RedisError, OSError) as exc:
                log.warning("Redis: %s: %s; looking again in %g s", type(exc).__name__, exc, settings.controller_interval)
            except errors.VtpError as exc:
                log.warning("%s; looking again in %g s", exc, settings.controller_interval)
            except Exception:  # noqa: BLE001 - a surprise answer must not stop the scaling
                log.exception("controller tick failed; looking again in %g s", settings.controller_interval)
            await anyio.sleep(settings.controller_interval)
    finally:
        await redis.aclose()
        await backend.aclose()


async def serve_figures(figures: Figures, port: int, host: str = "0.0.0.0"):
    """``GET /metrics`` -> the last look as JSON; returns the runner (``await runner.cleanup()``)."""
    from aiohttp import web

    async def metrics(_request):
        return web.json_response(figures.as_dict())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
