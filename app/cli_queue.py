"""``vtp worker`` and ``vtp submit``: the commands that need Redis (filled in by the DAG issue)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
