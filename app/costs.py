"""What a job cost: machine-seconds at the machine's $/hour, and $ per audio hour beside managed STT.

Every stage a worker runs adds its wall time to the job record (``JobRecord.machine_seconds``,
per stage) and that time's share of the machine's price (``JobRecord.cost_usd``): a worker that
runs N jobs at once charges each 1/N of the machine (``rate_per_slot_second``). The price is
``VTP_MACHINE_PRICE_HOUR``, or the list price of ``VTP_MACHINE_KIND`` below; the fleet
controller sets both on the machines it starts. Idle time between jobs is not charged to any
job: ``bench/fleet_sim.py`` measures how much of a fleet's billed time that is.

This module reads no messages at run time (``app.messages`` builds ``JobCost`` from the figures
here), so the two stay one-way: messages -> costs.
"""

from __future__ import annotations

from typing import Protocol

from app.config import Settings

class Usage(Protocol):
    """What a cost is read from (a ``JobRecord``: this module imports no message)."""

    machine_seconds: dict[str, float]
    cost_usd: float
    duration: float


#: $/hour list prices, fly.io/docs/about/pricing, as of writing: check yours and set
#: VTP_MACHINE_PRICE_HOUR. Fly's GPUs are unavailable after 2026-08-01.
PRICES: dict[str, float] = {
    "a100-40gb": 2.50,
    "a100-80gb": 3.50,
    "l40s": 1.25,
    "a10": 1.50,
    "performance-1x": 0.0431,
    "performance-2x": 0.0862,
    "performance-4x": 0.1724,
    "performance-8x": 0.3448,
    "performance-16x": 0.6895,
    "shared-cpu-4x": 0.0158,
    "shared-cpu-8x": 0.0316,
}

#: What managed speech-to-text charges per audio hour: from its cheap end (OpenAI's
#: gpt-4o-mini-transcribe, $0.003 a minute; bench/prices.toml has the sources) to $0.036 a minute
#: list prices.
MANAGED_STT_PER_AUDIO_HOUR = (0.18, 2.16)


def price_per_hour(settings: Settings) -> float:
    """$/hour of this process's machine (0 when neither a price nor a known kind is set)."""
    if settings.machine_price_hour > 0:
        return settings.machine_price_hour
    return PRICES.get(settings.machine_kind.strip().lower(), 0.0)


def rate_per_slot_second(settings: Settings, slots: int) -> float:
    """$ per second of one of ``slots`` jobs running at once on this machine."""
    return price_per_hour(settings) / 3600.0 / max(slots, 1)


def per_audio_hour(cost_usd: float, audio_seconds: float) -> float | None:
    """$ per hour of media; None before the duration is known."""
    if audio_seconds <= 0:
        return None
    return cost_usd / (audio_seconds / 3600.0)


def summary(record: Usage) -> str:
    """``"412.3 machine-s, $0.0214 ($0.31 per audio hour; managed STT $0.18-$2.16)"``; "" if none recorded."""
    seconds = sum(record.machine_seconds.values())
    if seconds <= 0:
        return ""
    text = f"{seconds:.1f} machine-s"
    if record.cost_usd > 0:
        text += f", ${record.cost_usd:.4f}"
        rate = per_audio_hour(record.cost_usd, record.duration)
        if rate is not None:
            low, high = MANAGED_STT_PER_AUDIO_HOUR
            text += f" (${rate:.2f} per audio hour; managed STT ${low:.2f}-${high:.2f})"
    return text
