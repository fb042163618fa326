"""Spans: ``(start, end)`` pairs of seconds or samples, merged and subtracted.

The VAD merges the regions its blocks found, the safety net subtracts speech from loud
stretches, and the coverage check subtracts words from speech and finds the speech regions a gap
overlaps: one way of doing each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

N = TypeVar("N", int, float)


def merge(spans: Iterable[tuple[N, N]], *, touching: bool = True) -> list[tuple[N, N]]:
    """Sorted, with overlapping spans joined, and touching ones too unless ``touching`` is False
    (the VAD keeps the places where its own regions meet: a chunk may be cut there)."""
    out: list[tuple[N, N]] = []
    for start, end in sorted(spans):
        if out and (start <= out[-1][1] if touching else start < out[-1][1]):
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap(a: tuple[N, N], b: tuple[N, N]) -> bool:
    """Whether ``a`` and ``b`` share some length (spans that only touch do not)."""
    return a[0] < b[1] and b[0] < a[1]


def subtract(spans: Iterable[tuple[N, N]], holes: list[tuple[N, N]]) -> list[tuple[N, N]]:
    """What of ``spans`` no hole covers; ``holes`` sorted by start."""
    out: list[tuple[N, N]] = []
    for start, end in spans:
        for h_start, h_end in holes:
            if h_end <= start or h_start >= end:
                continue
            if h_start > start:
                out.append((start, h_start))
            start = max(start, h_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out
