"""A terminal progress bar fed by ``ProgressEvent``s (local runs and ``submit --wait`` alike)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from app.messages import ProgressEvent

#: States whose progress counts seconds of the input's audio (the others count speech).
_AUDIO_STATES = ("extracting", "segmenting")
_KNOWN = "{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s WHAT [{elapsed}<{remaining}]"
_UNKNOWN = "{desc} {n:.0f} s WHAT [{elapsed}]"  # a stream that declares no duration


class ProgressBar:
    """One bar per input: the stage in its label; seconds of audio decoded while extracting and
    segmenting, seconds of speech transcribed after that. Each stage starts the bar afresh, so
    its rate and time left are the stage's own."""

    def __init__(self, name: str, *, enabled: bool = True) -> None:
        self.name = name if len(name) <= 32 else name[:29] + "..."
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._state = ""

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        what = "audio" if event.state in _AUDIO_STATES else "speech"
        known = event.audio_total > 0 or event.state not in _AUDIO_STATES
        bar_format = (_KNOWN if known else _UNKNOWN).replace("WHAT", what)
        desc = f"{self.name} [{event.state}]"
        total = max(event.audio_total, 1e-6) if event.audio_total else 1.0
        bar = self._bar
        if bar is None:
            bar = self._bar = tqdm(
                total=total, desc=desc, unit="s", file=sys.stderr, leave=False, dynamic_ncols=True, bar_format=bar_format
            )
        elif event.state not in (self._state, "done") and (event.audio_total or event.audio_done):
            # a stage that counts: the rate and time left restart with it
            bar.bar_format = bar_format
            bar.set_description_str(desc, refresh=False)
            bar.reset(total=total)
        else:  # the same stage, or one that reports no count (merging...): keep the count shown
            bar.set_description_str(desc, refresh=False)
            if event.audio_total:
                bar.total = total
        self._state = event.state
        if event.state == "done":
            bar.n = bar.total
        elif event.audio_done:
            bar.n = event.audio_done
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
