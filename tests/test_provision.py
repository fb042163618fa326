"""``make test``'s provisioning (tests/provision.py): what it finds, what it would install, and the
one line it stops with, on machines that lack redis-server or Chromium. Run in dry-run mode or on
the pure ``plan``: nothing is installed here."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from provision import APT_UPDATE, Facts, plan

ROOT = Path(__file__).resolve().parents[1]
BARE = Facts(redis=None, system_chromium=None, playwright_chromium=None, root=False, apt=False, playwright=True)


@pytest.fixture(autouse=True)
def no_chromium_override(monkeypatch):
    monkeypatch.delenv("VTP_CHROMIUM", raising=False)


def test_everything_present_runs_nothing():
    p = plan(Facts(redis="/usr/bin/redis-server", system_chromium="/usr/bin/chromium", playwright_chromium=None,
                   root=False, apt=False, playwright=True))
    assert p.commands == [] and not p.stop and p.found == ["redis-server: /usr/bin/redis-server", "chromium: /usr/bin/chromium"]


def test_root_with_apt_installs_debian_packages_in_one_go():
    p = plan(replace(BARE, root=True, apt=True))
    assert p.commands == [APT_UPDATE, ["apt-get", "install", "-y", "-qq", "redis-server", "chromium"]] and not p.stop


def test_playwrights_own_chromium_is_used_or_downloaded_without_root():
    cached = plan(replace(BARE, redis="/r", playwright_chromium="/cache/chrome"))
    assert cached.commands == [] and "chromium: /cache/chrome" in cached.found
    p = plan(replace(BARE, redis="/r"))
    assert p.commands == [[sys.executable, "-m", "playwright", "install", "chromium"]] and p.check_playwright_browser


def test_a_system_chromium_wins_over_a_download_and_over_apt():
    p = plan(replace(BARE, redis="/r", system_chromium="/usr/bin/chromium", root=True, apt=True))
    assert p.commands == [] and "chromium: /usr/bin/chromium" in p.found


def test_without_a_way_to_install_it_stops_with_what_to_install():
    p = plan(BARE)
    assert "redis-server" in p.stop and "apt-get install redis-server" in p.stop and p.commands == []
    p = plan(replace(BARE, redis="/r", playwright=False))
    assert "Chromium" in p.stop and "apt-get install chromium" in p.stop and "playwright install chromium" in p.stop


def test_cli_on_a_path_without_redis_or_chromium_stops_at_once_with_one_line(tmp_path):
    """The real script, with a PATH that holds neither tool nor apt-get: one line, exit 1, at once."""
    env = {k: v for k, v in os.environ.items() if k != "VTP_CHROMIUM"}
    env["PATH"] = str(tmp_path)
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "provision.py"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "needs redis-server" in res.stderr


def test_cli_dry_run_says_what_it_would_install(tmp_path):
    """redis-server present, no Chromium anywhere, no apt-get: it would have Playwright download one."""
    (tmp_path / "redis-server").symlink_to("/bin/true")
    env = {k: v for k, v in os.environ.items() if k != "VTP_CHROMIUM"}
    env["PATH"] = str(tmp_path)
    env["PLAYWRIGHT_BROWSERS_PATH"] = str(tmp_path / "no-browsers")  # as if none was ever downloaded
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "provision.py"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"redis-server: {tmp_path}/redis-server" in res.stdout
    assert "would run: " + " ".join([sys.executable, "-m", "playwright", "install", "chromium"]) in res.stdout


def test_before_the_install_a_download_waits_and_a_missing_redis_stops():
    p = plan(replace(BARE, redis="/r", playwright=False), before_install=True)
    assert p.commands == [] and not p.stop  # Playwright comes with the install: its download waits
    assert "redis-server" in plan(replace(BARE, playwright=False), before_install=True).stop
