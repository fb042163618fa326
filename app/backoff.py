"""Exponential backoff, written once: the delay before a retry, and the two jitters in use.

Attempt 1 waits ``base``, each further attempt twice the one before, never more than ``cap``.
Used by Redis outages (``app.redis_outage.retrying``), stage retries (``workers.runtime.policy``),
the worker's reconnect loop, webhook delivery (equal jitter) and the Fly Machines API client
(full jitter).
"""

from __future__ import annotations

import random


def exponential(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2, ...): ``base`` doubling, at most ``cap``."""
    return min(base * 2 ** (attempt - 1), cap)


def equal_jitter(delay: float) -> float:
    """Between half of ``delay`` and all of it (spreads retries, keeps most of the wait)."""
    return delay / 2 + random.uniform(0, delay / 2)


def full_jitter(delay: float) -> float:
    """Anywhere between 0 and ``delay`` (spreads retries of many clients the most)."""
    return random.uniform(0, delay)
