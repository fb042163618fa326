"""Settings are declared in sections, each variable named once beside its field, and the worker
environment the fleet controller forwards is derived from the sections a worker reads: never a
secret."""

from __future__ import annotations

from dataclasses import fields

import pytest

from app import errors
from app.config import Settings

SECTIONS = {"queue", "storage", "host", "media", "gpu", "client", "web", "webhooks", "fleet", "costs"}


def test_every_setting_names_its_variable_once_in_a_known_section():
    declared = [(f.name, f.metadata["env"], f.metadata["section"]) for f in fields(Settings)]
    variables = [var for _, var, _ in declared]
    assert len(variables) == len(set(variables))
    assert {section for _, _, section in declared} == SECTIONS
    assert Settings.WORKER_SECTIONS <= SECTIONS
    assert Settings.env_var("lease") == "VTP_LEASE" and "lease" in Settings.section("queue")


def test_the_worker_env_is_the_worker_sections_without_a_secret():
    forwarded = Settings.for_workers()
    assert forwarded == {n for s in Settings.WORKER_SECTIONS for n in Settings.section(s)} - Settings.secrets()
    assert Settings.secrets() == {"redis_url", "api_tokens", "webhook_secret", "fly_api_token"}
    env = {f.metadata["env"]: "7" if isinstance(f.default, (int, float)) else f"value-{f.name}" for f in fields(Settings)}
    env["REDIS_URL"] = "redis://:pw-5f1c@redis:6379/0"
    settings = Settings.from_env(env)
    sent = settings.worker_env()
    assert set(sent) == {Settings.env_var(n) for n in forwarded}
    assert not set(sent.values()) & set(settings.secret_values())


def test_a_malformed_number_names_its_variable():
    with pytest.raises(errors.OptionsError, match="VTP_LEASE='soon' is not a valid float"):
        Settings.from_env({"VTP_LEASE": "soon"})
