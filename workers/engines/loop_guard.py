"""The looping guard: a decode that ends in back-to-back copies of one unit is cut, and a row
that starts looping is ended at once (``LoopGuard``, a transformers logits processor).

Without it one looping chunk runs its whole batch to Whisper's token limit, and its text repeats
a phrase dozens of times. ``loop_cut`` and ``LoopGuard`` apply the same rule, one to finished
tokens, one to every generation step.
"""

from __future__ import annotations

import numpy as np

#: The looping guard (``loop_cut``): a tail of back-to-back copies of a unit of at most
#: LOOP_MAX_PERIOD tokens, at least LOOP_REPEATS copies and LOOP_MIN_TOKENS tokens long. Speech
#: repeats a phrase twice, seldom three times; "no, no, no" stays well under 24 tokens.
LOOP_MAX_PERIOD = 48
LOOP_REPEATS = 4
LOOP_MIN_TOKENS = 24


def _loop_need() -> np.ndarray:
    """Tokens a tail repeating a unit of p = 1..LOOP_MAX_PERIOD tokens must span to be a loop."""
    periods = np.arange(1, LOOP_MAX_PERIOD + 1)
    return np.maximum(LOOP_MIN_TOKENS, LOOP_REPEATS * periods)


def loop_cut(tokens: list[int], timestamp_begin: int) -> int | None:
    """Where a decode that ends in a loop is cut: after the first copy of the unit it repeats
    (the shortest such unit); None when it does not end in one. A loop is a tail of back-to-back
    copies of a unit of at most ``LOOP_MAX_PERIOD`` tokens, ``LOOP_REPEATS`` copies or more and
    ``LOOP_MIN_TOKENS`` tokens or more; timestamp tokens count as one token (a loop of segments
    whose times move on is still a loop). ``LoopGuard`` ends a row on the same rule."""
    x = [t if t < timestamp_begin else timestamp_begin for t in tokens]
    n = len(x)
    need = _loop_need()
    for p in range(1, min(LOOP_MAX_PERIOD, n) + 1):
        run = 0
        while run < n - p and x[n - 1 - run] == x[n - 1 - run - p]:
            run += 1
        if run + p >= need[p - 1]:
            return n - run
    return None


class LoopGuard:
    """A logits processor that ends a looping row: once a row's generated tokens end in a loop
    (``loop_cut``'s rule), its only choice is end of text, at no cost to its score. Without it one
    looping chunk runs its whole batch to Whisper's token limit. Vectorised over the batch and
    the periods: a loop of period p means the last need(p) - p tokens each equal the token p
    before, so one gather compares those pairs for every period at once (~3,500 per row)."""

    def __init__(self, begin: int, eot: int, timestamp_begin: int) -> None:
        self.begin, self.eot, self.timestamp_begin = begin, eot, timestamp_begin
        self._index = None

    def _indices(self, device):
        import torch

        if self._index is None:
            width = int(_loop_need().max())  # tokens looked at: the longest loop's span
            later, earlier, period_of = [], [], []
            for p, need in enumerate(_loop_need(), start=1):
                for j in range(width - (need - p), width):
                    later.append(j)
                    earlier.append(j - p)
                    period_of.append(p - 1)
            self._index = (
                width,
                torch.tensor(later, device=device),
                torch.tensor(earlier, device=device),
                torch.tensor(period_of, device=device),
            )
        return self._index

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.begin :]
        if generated.shape[1] < LOOP_MIN_TOKENS:
            return scores
        width, later, earlier, period_of = self._indices(input_ids.device)
        tail = generated[:, -width:].clamp(max=self.timestamp_begin)  # every timestamp alike
        if tail.shape[1] < width:  # pad with values that match nothing
            pad = -1 - torch.arange(width - tail.shape[1], device=tail.device, dtype=tail.dtype)
            tail = torch.cat([pad.expand(tail.shape[0], -1), tail], dim=1)
        differ = (tail[:, later] != tail[:, earlier]).to(torch.int32)
        # per row and period: how many of its pairs differ (none: a loop)
        counts = torch.zeros(tail.shape[0], LOOP_MAX_PERIOD, dtype=torch.int32, device=tail.device)
        counts.index_add_(1, period_of, differ)
        looping = (counts == 0).any(-1)
        if not bool(looping.any()):  # (generate syncs every step anyway, for its stopping test)
            return scores
        scores = scores.masked_fill(looping[:, None], -float("inf"))
        scores[looping, self.eot] = 0.0
        return scores
