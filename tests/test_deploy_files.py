"""fly.toml, Procfile and Dockerfile name commands that vtp's own CLI accepts; and the Fly and
Kubernetes recipes *start*: each command goes through vtp's parser and the start-up checks it
runs before serving (the web process's binding rules), with the settings the recipe and the
README's steps give it."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def parses(command: str) -> None:
    argv = shlex.split(command.replace("${PORT:-8000}", "8000"))
    assert argv[0] == "vtp"
    if argv[1] == "web":
        return
    build_parser().parse_args(argv[1:])


def test_fly_toml():
    doc = tomllib.loads((ROOT / "fly.toml").read_text())
    assert set(doc["processes"]) == {"web", "cpu-worker", "controller"}
    for command in doc["processes"].values():
        parses(command)
    assert doc["http_service"]["processes"] == ["web"]
    assert doc["http_service"]["checks"][0]["path"] == "/healthz"
    assert "vtp worker --queue cpu --check" in " ".join(doc["http_service"]["machine_checks"][0]["command"])
    assert "--backend fly" in doc["processes"]["controller"]


def test_procfile():
    entries = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert set(entries) == {"web", "worker", "gpu-worker", "controller"}
    for command in entries.values():
        parses(command.strip())


def test_dockerfile_has_a_cuda_variant():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.12-slim" in text and "nvidia/cuda" in text
    assert 'pip install ".[${EXTRAS}]"' in text


# -- the recipes start: each command through vtp's parser and start-up checks, with the env the
# -- recipe and the README's steps give it --------------------------------------------------------

def readme_block(heading: str) -> str:
    """The first ```sh block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```sh") + 5 : section.index("```", section.index("```sh") + 5)]


def value_of(raw: str) -> str:
    """A secret's value as a step sets it: the literal, or a stand-in for a command's output."""
    raw = raw.strip().strip('"').strip("'")
    return "0123456789abcdef" * 4 if "$(" in raw else raw


def starts(command: str | list[str], env: dict[str, str]) -> None:
    """What `vtp` does before it serves: parse the command, read the settings, and the start-up
    checks of the web process (binding rules, webhook key) or the controller (its backend)."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[0] == "vtp"
    args = build_parser().parse_args(argv[1:])
    settings = Settings.from_env(env)
    if args.command == "web":
        from app.web.server import check_binding

        check_binding(args.host, settings, args.insecure)  # raises OptionsError: refuses to start
        if settings.webhook_secret:
            from app.webhooks import secret_key

            secret_key(settings.webhook_secret)
    if args.command == "controller" and args.backend == "fly":
        import asyncio

        from workers.controller.loop import open_backend

        async def open_and_close() -> None:
            backend = open_backend(args.backend, settings)
            await backend.aclose()

        asyncio.run(open_and_close())


def fly_env() -> dict[str, str]:
    """fly.toml's [env], the secrets the README's Fly steps set, and what Fly sets in a machine."""
    doc = tomllib.loads((ROOT / "fly.toml").read_text())
    env = dict(doc["env"])
    for name, raw in re.findall(r"fly secrets set (\w+)=(\S+)", readme_block("### On Fly.io")):
        env[name] = value_of(raw)
    env.update(FLY_APP_NAME=doc["app"], FLY_IMAGE_REF=f"registry.fly.io/{doc['app']}:deployment-1")
    return env


def test_fly_recipe_starts_with_the_readme_steps():
    env = fly_env()
    assert env.get("REDIS_URL") and env.get("FLY_API_TOKEN")
    for name, command in tomllib.loads((ROOT / "fly.toml").read_text())["processes"].items():
        starts(command, env)
    # and without the token step the web process would refuse, as it should
    from app import errors

    with pytest.raises(errors.OptionsError, match="without VTP_API_TOKENS"):
        starts(tomllib.loads((ROOT / "fly.toml").read_text())["processes"]["web"], {**env, "VTP_API_TOKENS": ""})


def test_kubernetes_web_starts_with_the_readme_steps():
    k8s = ROOT / "deploy" / "k8s"
    config = yaml.safe_load((k8s / "config.yaml").read_text())
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all((k8s / "secret.yaml").read_text()) if d}
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    steps = readme_block("### On Kubernetes")
    for gen in kustomization.get("secretGenerator", []):  # files the README's steps write
        for envs in gen.get("envs", []):
            lines = re.findall(rf'echo "([^"]+)" > deploy/k8s/{re.escape(envs)}', steps)
            assert lines, f"no README step writes deploy/k8s/{envs}"
            secrets[gen["name"]] = dict(value_of_line(line) for line in lines)
    (deployment,) = [d for d in yaml.safe_load_all((k8s / "web.yaml").read_text()) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == config["metadata"]["name"]
            env.update(config["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    starts(container["command"], env)


def value_of_line(line: str) -> tuple[str, str]:
    name, _, raw = line.partition("=")
    return name, value_of(raw)
