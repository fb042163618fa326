"""What ``make test`` needs from the machine beyond Python packages, provisioned before pytest runs.

    python3 tests/provision.py --before-install [--dry-run]   # before pip: redis-server, apt's Chromium
    .venv/bin/python tests/provision.py [--dry-run]            # after: Playwright's own where needed

The suite starts private ``redis-server`` processes and drives a Chromium through Playwright.
This finds them or installs them, the way each one's ecosystem does, and otherwise stops at once
with one line saying what to install (exit 1), so a missing tool never fails deep in the suite.

redis-server: on ``PATH``; else, as root where ``apt-get`` exists, Debian's ``redis-server``
package. (No well-kept pip package ships the server.)

Chromium, first found wins:
  1. ``$VTP_CHROMIUM``, a Chromium or Chrome binary to use;
  2. a system Chromium on ``PATH`` (``chromium``, ``chromium-browser``: Debian's and Ubuntu's);
  3. Playwright's own Chromium, already downloaded (``~/.cache/ms-playwright``);
  4. as root where ``apt-get`` exists: Debian's ``chromium`` package (it brings the libraries a
     browser needs, which a downloaded one lacks on a bare machine);
  5. otherwise Playwright downloads its own (``playwright install chromium``); where that
     browser then cannot start for lack of system libraries, the line says how to add them.

``make test`` runs it twice: ``--before-install`` with the system Python, so that a machine without
redis-server stops in a second and not after the minutes of ``pip install`` (Playwright's download
waits for the second run, once the venv holds Playwright); then with the venv's Python.
``--dry-run`` prints what it would do and changes nothing. The browser tests use ``chromium()``
to find the same browser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Facts:
    """What the machine has, gathered once (``Facts.gather``), so ``plan`` is a pure function."""

    redis: str | None
    system_chromium: str | None
    playwright_chromium: str | None
    root: bool
    apt: bool
    #: A Python with Playwright installed (the venv's), for ``playwright install``.
    playwright: bool

    @classmethod
    def gather(cls) -> Facts:
        return cls(
            redis=shutil.which("redis-server"),
            system_chromium=system_chromium(),
            playwright_chromium=playwright_chromium(),
            root=hasattr(os, "geteuid") and os.geteuid() == 0,
            apt=shutil.which("apt-get") is not None,
            playwright=_has_playwright(),
        )


@dataclass
class Plan:
    #: Commands to run, in order.
    commands: list[list[str]] = field(default_factory=list)
    #: One line per thing found.
    found: list[str] = field(default_factory=list)
    #: The one line to stop with, if something can be neither found nor installed.
    stop: str = ""
    #: Check after installing that Playwright's own browser starts.
    check_playwright_browser: bool = False


APT_UPDATE = ["apt-get", "update", "-qq"]


def apt_install(packages: list[str]) -> list[str]:
    return ["apt-get", "install", "-y", "-qq", *packages]


def plan(facts: Facts, *, before_install: bool = False) -> Plan:
    """What to run, or the line to stop with. ``before_install``: Playwright is not there yet but
    will be, so a Chromium it would download is left to the run after the install."""
    p = Plan()
    apt_packages: list[str] = []
    if facts.redis:
        p.found.append(f"redis-server: {facts.redis}")
    elif facts.root and facts.apt:
        apt_packages.append("redis-server")
    else:
        p.stop = ("make test needs redis-server: install it (Debian/Ubuntu: sudo apt-get install redis-server; "
                  "macOS: brew install redis) and run make test again")
        return p
    chromium = os.environ.get("VTP_CHROMIUM") or facts.system_chromium or facts.playwright_chromium
    if chromium:
        p.found.append(f"chromium: {chromium}")
    elif facts.root and facts.apt:
        apt_packages.append("chromium")
    elif before_install:
        p.found.append("chromium: none yet (Playwright's own, after the install)")
    elif facts.playwright:
        p.commands.append([sys.executable, "-m", "playwright", "install", "chromium"])
        p.check_playwright_browser = True
    else:
        p.stop = ("make test needs Chromium for its browser tests: install it (Debian: sudo apt-get install chromium; "
                  "or .venv/bin/python -m playwright install chromium) and run make test again")
        return p
    if apt_packages:
        p.commands[:0] = [APT_UPDATE, apt_install(apt_packages)]
    return p


# -- finding a browser --------------------------------------------------------------------------


def system_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


def playwright_chromium() -> str | None:
    """Playwright's own Chromium, if it has been downloaded."""
    if not _has_playwright():
        return None
    from playwright.sync_api import Error, sync_playwright

    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Error:
        return None
    return path if path and Path(path).is_file() else None


def chromium() -> str | None:
    """The browser the tests drive: the same order as ``plan`` (``None``: none on this machine)."""
    return os.environ.get("VTP_CHROMIUM") or system_chromium() or playwright_chromium()


def browser_starts(path: str) -> str:
    """"" if the browser binary runs; else the first line of what it said."""
    try:
        res = subprocess.run([path, "--headless", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if res.returncode == 0:
        return ""
    return (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[0]


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    p = plan(Facts.gather(), before_install="--before-install" in argv)
    for line in p.found:
        print(f"provision: {line}")
    if p.stop:
        print(f"provision: {p.stop}", file=sys.stderr)
        return 1
    for cmd in p.commands:
        print(f"provision: {'would run' if dry else 'running'}: {' '.join(cmd)}", flush=True)
        if not dry:
            res = subprocess.run(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if res.returncode != 0:
                print(f"provision: {' '.join(cmd)} failed (exit {res.returncode}); install it by hand and run make test again",
                      file=sys.stderr)
                return 1
    if p.check_playwright_browser and not dry:
        path = playwright_chromium()
        problem = browser_starts(path) if path else "Playwright's Chromium is missing after installing it"
        if problem:
            print(f"provision: Playwright's Chromium cannot start ({problem}): run "
                  f"sudo {sys.executable} -m playwright install-deps chromium, then make test again", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
