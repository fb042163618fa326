"""deploy/k8s and the controller's Kubernetes Jobs, checked with the official client's models
(no cluster needed): every manifest deserializes into its model *and back to the same document*
(a misspelled or misplaced field would be dropped on the way), the commands parse with vtp's own
CLI parser, and the controller's Job spec is checked the same way."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from app.cli import build_parser
from app.config import Settings
from workers.controller.kube import LABELS, job_machine, job_manifest
from workers.controller.loop import Figures
from workers.controller.queue import Health

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("batch/v1", "Job"): "V1Job",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
}
API = k8s.ApiClient()


def to_model(doc: dict, model: str):
    return API._ApiClient__deserialize(doc, model)  # noqa: SLF001 - the client's own dict -> model


def to_doc(model) -> dict:
    return json.loads(json.dumps(API.sanitize_for_serialization(model)))


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def workloads() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path, doc in documents() if doc["kind"] in ("Deployment", "StatefulSet") and path.parent == K8S}


def test_every_core_manifest_round_trips_through_the_client_models():
    seen = set()
    for path, doc in documents():
        kind = (doc["apiVersion"], doc["kind"])
        if doc["kind"] in ("Kustomization", "ScaledJob"):
            continue
        assert kind in MODELS, f"{path.name}: unexpected {kind}"
        model = to_model(doc, MODELS[kind])
        assert to_doc(model) == json.loads(json.dumps(doc)), f"{path.name}: {doc['kind']} {doc['metadata'].get('name')} lost fields"
        seen.add(doc["kind"])
    assert {"Deployment", "Service", "StatefulSet", "Job", "Role", "RoleBinding", "ServiceAccount", "ConfigMap", "Secret"} <= seen


def test_kustomizations_list_existing_files():
    for kust in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kust.read_text())
        for res in doc["resources"]:
            assert (kust.parent / res).is_file(), f"{kust}: {res} is missing"
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "gpu-worker-job.yaml" not in base["resources"]  # the controller creates those


def test_commands_are_vtp_commands():
    parser = build_parser()
    w = workloads()
    assert w["vtp-web"]["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["vtp", "web"]
    for name in ("vtp-cpu-worker", "vtp-controller"):
        for c in w[name]["spec"]["template"]["spec"]["containers"]:
            args = parser.parse_args(c["command"][1:])
            assert args.command in ("worker", "controller")
            probe = (c.get("livenessProbe") or {}).get("exec")
            if probe:
                assert parser.parse_args(probe["command"][1:]).check
    ctl = w["vtp-controller"]["spec"]["template"]["spec"]
    assert ctl["serviceAccountName"] == "vtp-controller"
    assert parser.parse_args(ctl["containers"][0]["command"][1:]).backend == "kubernetes"


def test_controller_role_allows_what_the_backend_does():
    role = next(doc for _, doc in documents() if doc["kind"] == "Role")
    jobs = next(r for r in role["rules"] if "jobs" in r["resources"])
    assert jobs["apiGroups"] == ["batch"] and {"create", "delete", "list"} <= set(jobs["verbs"])


def test_keda_scaled_job_scales_on_the_controllers_figure():
    scaled = next(doc for _, doc in documents() if doc["kind"] == "ScaledJob")
    spec = scaled["spec"]
    job_spec = to_model(spec["jobTargetRef"], "V1JobSpec")
    assert to_doc(job_spec) == spec["jobTargetRef"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metadata"]["valueLocation"] in Figures().as_dict()
    container = job_spec.template.spec.containers[0]
    assert build_parser().parse_args(container.command[1:]).idle_exit > 0
    assert container.resources.limits == {"nvidia.com/gpu": "1"}


def test_the_controllers_job_spec():
    settings = Settings.from_env(
        {"VTP_WORKER_IMAGE": "ghcr.io/x/vtp:cuda", "VTP_IDLE_EXIT": "90", "VTP_BATCH_SIZE": "4", "REDIS_URL": "redis://:pw@r:6379/0"}
    )
    job = job_manifest(settings, "vtp-gpu-abc")
    doc = to_doc(job)
    assert to_doc(to_model(doc, "V1Job")) == doc
    spec = to_model(doc, "V1Job").spec
    pod = spec.template.spec
    (c,) = pod.containers
    args = build_parser().parse_args(c.command[1:])
    assert (args.command, args.queue, args.idle_exit, args.name) == ("worker", "gpu", 90.0, "vtp-gpu-abc")
    assert c.resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.restart_policy == "Never" and spec.backoff_limit == 0 and spec.ttl_seconds_after_finished == 300
    env = {e.name: e.value for e in c.env}
    assert env["VTP_BATCH_SIZE"] == "4" and "REDIS_URL" not in env and "pw" not in json.dumps(doc)
    assert [s.secret_ref.name for s in c.env_from if s.secret_ref] == ["vtp-secrets"]
    assert job.metadata.labels == LABELS == spec.template.metadata.labels
    # the hand-run template shows the same Job
    template = yaml.safe_load((K8S / "gpu-worker-job.yaml").read_text())
    assert template["metadata"]["labels"] == LABELS
    assert template["spec"]["backoffLimit"] == spec.backoff_limit
    assert template["spec"]["template"]["spec"]["restartPolicy"] == pod.restart_policy
    cpu = job_manifest(Settings.from_env({"VTP_WORKER_IMAGE": "x", "VTP_K8S_GPUS": "0"}), "w").spec.template.spec
    assert cpu.containers[0].resources is None and cpu.tolerations is None


def test_no_secret_in_the_job_body():
    """The Job (readable by whoever may list Jobs) names the Secret; it never holds a value."""
    secrets = {
        "REDIS_URL": "rediss://default:redis-pw-5f1c9e@redis.example:6379/0",
        "VTP_API_TOKENS": "api-token-a8d2e4",
        "VTP_WEBHOOK_SECRET": "whsec_d2ViaG9vay1zZWNyZXQtdmFsdWUtMzJieXRlcyEhIQ==",
        "FLY_API_TOKEN": "fly-token-0c4e2a",
    }
    settings = Settings.from_env({"VTP_WORKER_IMAGE": "x", "VTP_BATCH_SIZE": "4", **secrets})
    text = json.dumps(to_doc(job_manifest(settings, "vtp-gpu-1")))
    for value in [*settings.secret_values(), "redis-pw-5f1c9e"]:
        assert value not in text, value
    (c,) = job_manifest(settings, "vtp-gpu-1").spec.template.spec.containers
    assert {e.name for e in c.env} <= {Settings.env_var(f) for f in Settings.for_workers()} | {"VTP_MACHINE_KIND", "VTP_MACHINE_PRICE_HOUR"}
    assert [s.secret_ref.name for s in c.env_from if s.secret_ref] == ["vtp-secrets"]


def test_startup_probe_waits_as_long_as_the_controller():
    """The kubelet never gives up on a booting worker before the controller would (boot grace)."""
    for grace in (300, 900, 1200):
        (c,) = job_manifest(Settings.from_env({"VTP_WORKER_IMAGE": "x", "VTP_BOOT_GRACE": str(grace)}), "w").spec.template.spec.containers
        probe = c.startup_probe
        assert probe.period_seconds * probe.failure_threshold >= grace
    # the hand-run template shows the default
    template = yaml.safe_load((K8S / "gpu-worker-job.yaml").read_text())
    probe = template["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= Settings().boot_grace


def test_job_states_map_onto_machines():
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    meta = k8s.V1ObjectMeta(name="vtp-gpu-1", creation_timestamp=t0)
    pending = job_machine(k8s.V1Job(metadata=meta, status=k8s.V1JobStatus()), {})
    assert pending.state == "starting" and pending.since == t0.timestamp() and not pending.restartable
    running = job_machine(k8s.V1Job(metadata=meta, status=k8s.V1JobStatus(active=1, start_time=t0)), {"vtp-gpu-1": Health("vtp-gpu-1", 1)})
    assert running.state == "started" and running.busy
    done = job_machine(k8s.V1Job(metadata=meta, status=k8s.V1JobStatus(succeeded=1, completion_time=t0)), {})
    assert done.state == "stopped" and not done.alive


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_yaml_is_plain(path):
    for doc in yaml.safe_load_all((K8S / path).read_text()):
        assert doc is None or "kind" in doc


def test_controller_without_kubernetes_configuration_says_so(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "VTP_WORKER_IMAGE": "x"}
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "controller", "--backend", "kubernetes"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "no Kubernetes configuration" in res.stderr and "Traceback" not in res.stderr
