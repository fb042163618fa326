"""fly.toml, Procfile and Dockerfile name commands that vtp's own CLI accepts (``vtp web``
belongs to the web process and is only checked for its name)."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from app.cli import build_parser

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
