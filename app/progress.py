"""A terminal progress bar fed by ``ProgressEvent``s (local runs and ``submit --wait`` alike)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from app.messages import ProgressEvent


class ProgressBar:
    """One bar per input: the stage in its label, speech seconds transcribed as its count."""

    def __init__(self, name: str, *, enabled: bool = True) -> None:
        self.name = name if len(name) <= 32 else name[:29] + "..."
        self.enabled = enabled
        self._bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(
                total=1.0,
                unit="s",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s speech [{elapsed}<{remaining}]",
            )
        bar = self._bar
        bar.set_description_str(f"{self.name} [{event.state}]", refresh=False)
        if event.audio_total:
            bar.total = max(event.audio_total, 1e-6)
        if event.state == "done":
            bar.n = bar.total
        elif event.audio_done:
            bar.n = event.audio_done
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
