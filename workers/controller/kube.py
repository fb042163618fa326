"""The controller's Kubernetes backend: one ``batch/v1`` Job per worker machine.

Each Job runs one pod, ``vtp worker --queue gpu --idle-exit N --name <job>``, requesting
``nvidia.com/gpu`` (``VTP_K8S_GPUS``; 0 for a CPU worker). When the queue drains the worker
exits 0, the Job completes and its pod releases the GPU (and, with a cluster autoscaler, the
node); ``ttlSecondsAfterFinished`` (``VTP_K8S_JOB_TTL``) deletes it. A Job is never restarted:
the warm pool is the cluster's business (its node pool), so ``Machine.restartable`` is False.

Jobs map onto the controller's machine states: no active pod yet ``starting``, an active pod
``started``, completed or failed ``stopped`` (a failed one is the same to the controller: it
holds no job; arq reruns what its worker had once the lease expires).

The official ``kubernetes`` client is synchronous; its calls run in a thread. Its pods get
their secrets (``REDIS_URL``, S3 credentials) from the Secret ``vtp-secrets`` *by reference*
(``envFrom.secretRef``: the Job body holds its name, never a value) and settings from the
ConfigMap ``vtp-config`` (deploy/k8s/); the allow-listed pipeline settings the controller itself
runs with (``Settings.worker_env``) are set on top, as on Fly.

The startup probe (``vtp worker --check``) allows ``VTP_BOOT_GRACE``: the kubelet never gives
up on a booting worker before the controller would (the controller counts from the Job's
start, which is earlier than the container's: scheduling, a GPU node scale-up and the image
pull come first).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from app import errors
from app.config import Settings
from workers.controller.decide import Machine, Plan
from workers.controller.queue import Health

log = logging.getLogger("vtp.controller")

LABELS = {
    "app.kubernetes.io/name": "vtp",
    "app.kubernetes.io/component": "gpu-worker",
    "app.kubernetes.io/managed-by": "vtp-controller",
}
SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())
SECRET = "vtp-secrets"
CONFIG_MAP = "vtp-config"
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Seconds between two startup probes of a worker pod.
PROBE_PERIOD_S = 10


def startup_failures(boot_grace: float) -> int:
    """The startup probe's ``failureThreshold``: its window is ``VTP_BOOT_GRACE``, no shorter."""
    return max(1, math.ceil(boot_grace / PROBE_PERIOD_S))


def job_manifest(settings: Settings, name: str) -> k8s.V1Job:
    """The Job of one worker machine (what deploy/k8s/gpu-worker-job.yaml shows by hand)."""
    if not settings.image:
        raise errors.OptionsError("no worker image: set VTP_WORKER_IMAGE")
    gpus = settings.k8s_gpus
    env = settings.worker_env()  # no secret: REDIS_URL and the credentials come from the Secret, by reference
    env["VTP_MACHINE_KIND"] = settings.machine_kind or ("gpu" if gpus else "cpu")
    if settings.machine_price_hour > 0:
        env["VTP_MACHINE_PRICE_HOUR"] = f"{settings.machine_price_hour:g}"
    env.setdefault("VTP_DEVICE", "cuda" if gpus else "cpu")
    env.setdefault("VTP_COMPUTE_TYPE", "float16" if gpus else "int8")
    resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}) if gpus else None
    check = ["vtp", "worker", "--queue", "gpu", "--check", "--name", name]
    container = k8s.V1Container(
        name="worker",
        image=settings.image,
        command=["vtp", "worker", "--queue", "gpu", "--idle-exit", f"{settings.fleet_idle_exit:g}", "--name", name],
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
        env_from=[
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=CONFIG_MAP, optional=True)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=SECRET)),
        ],
        resources=resources,
        # The model loads before the worker polls (and writes its health key): give it time.
        startup_probe=k8s.V1Probe(
            _exec=k8s.V1ExecAction(command=check), period_seconds=PROBE_PERIOD_S,
            failure_threshold=startup_failures(settings.boot_grace),
        ),
        liveness_probe=k8s.V1Probe(_exec=k8s.V1ExecAction(command=check), period_seconds=30, failure_threshold=3),
    )
    tolerations = [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] if gpus else None
    pod = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=dict(LABELS)),
        spec=k8s.V1PodSpec(
            containers=[container],
            restart_policy="Never",  # a crashed worker is replaced by the controller, not restarted here
            tolerations=tolerations,
            # SIGTERM drains: the running batch finishes (one batch's deadline) before the pod goes.
            termination_grace_period_seconds=int(settings.transcribe_timeout) + 30,
        ),
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, labels=dict(LABELS)),
        spec=k8s.V1JobSpec(
            template=pod,
            backoff_limit=0,
            ttl_seconds_after_finished=settings.k8s_job_ttl,
        ),
    )


def _stamp(value) -> float:
    return value.timestamp() if value is not None else time.time()


def job_machine(job: k8s.V1Job, health: Mapping[str, Health]) -> Machine:
    """A Job as the controller's machine."""
    name = job.metadata.name
    status = job.status or k8s.V1JobStatus()
    h = health.get(name)
    if status.succeeded or status.failed or status.completion_time:
        ended = status.completion_time
        for c in status.conditions or ():
            if c.type in ("Complete", "Failed") and c.status == "True":
                ended = ended or c.last_transition_time
        return Machine(id=name, state="stopped", since=_stamp(ended), restartable=False)
    holding = h is not None and h.holding > 0
    if status.active:
        alive = h is not None and h.alive
        return Machine(
            id=name, state="started", since=_stamp(status.start_time or job.metadata.creation_timestamp),
            alive=alive, running=h.running if alive else 0, restartable=False, holding=holding,
        )
    return Machine(id=name, state="starting", since=_stamp(job.metadata.creation_timestamp), restartable=False, holding=holding)


def _namespace(settings: Settings) -> str:
    if settings.k8s_namespace:
        return settings.k8s_namespace
    try:
        return _NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass
class KubernetesBackend:
    settings: Settings
    api: k8s.BatchV1Api
    namespace: str
    name: str = "kubernetes"
    created: int = 0
    destroyed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesBackend:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            try:
                k8s_config.load_kube_config()
            except (k8s_config.ConfigException, OSError) as exc:
                raise errors.OptionsError(f"no Kubernetes configuration (in-cluster or ~/.kube/config): {exc}") from None
        job_manifest(settings, "check")  # bad settings fail now, not at the first burst
        return cls(settings, k8s.BatchV1Api(), _namespace(settings))

    async def aclose(self) -> None:
        self.api.api_client.close()

    async def _call(self, fn, *args, **kwargs):
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except ApiException as exc:
            what = f"Kubernetes API {fn.__name__} in namespace {self.namespace}"
            if exc.status in (401, 403):
                raise errors.FleetAuthError(f"{what}: the API refused the controller's credentials ({exc.status}: {exc.reason}); check its ServiceAccount and Role") from None
            raise errors.FleetError(f"{what}: {exc.status}: {exc.reason}") from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # connection refused, retries exhausted
            raise errors.FleetError(f"Kubernetes API unreachable: {exc}") from None

    async def machines(self, health: Mapping[str, Health]) -> list[Machine]:
        jobs = await self._call(self.api.list_namespaced_job, self.namespace, label_selector=SELECTOR)
        return [job_machine(j, health) for j in jobs.items if not j.metadata.deletion_timestamp]

    async def apply(self, plan: Plan, machines: list[Machine]) -> None:
        by_id = {m.id: m for m in machines}
        for name in plan.destroy:
            m = by_id.get(name)
            if m is not None and m.keep:  # decide() never asks this; the backend refuses anyway
                continue
            try:
                await self._call(self.api.delete_namespaced_job, name, self.namespace, propagation_policy="Background")
                self.destroyed += 1
            except errors.FleetAuthError:
                raise
            except errors.FleetError as exc:
                log.warning("could not delete Job %s: %s", name, exc)
        for _ in range(plan.start):
            name = f"vtp-gpu-{secrets.token_hex(4)}"
            await self._call(self.api.create_namespaced_job, self.namespace, job_manifest(self.settings, name))
            self.created += 1
            log.info("created Job %s in %s", name, self.namespace)
