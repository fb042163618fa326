"""A terminal progress bar fed by ``ProgressEvent``s (local runs and ``submit --wait`` alike)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from app import dag
from app.messages import ProgressEvent

#: States whose progress counts seconds of the input's audio; the later ones count speech.
#: States whose progress is audio seconds (before the chunks are known): up to segmenting.
_AUDIO_STATES = dag.STATES[: dag.ORDER[dag.STAGE["segment"].state] + 1]
_KNOWN = "{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s WHAT [{elapsed}<{remaining}]"
_UNKNOWN = "{desc} {n:.0f} s WHAT [{elapsed}]"  # a stream that declares no duration


class ProgressBar:
    """One bar per input, the stage in its label: seconds of audio decoded while extracting and
    segmenting, seconds of speech transcribed after that. A stage that brings its own count of
    audio restarts the bar (its rate and time left are the stage's own); a state change announced
    before the stage's first report, and the states after transcribing, keep the count shown."""

    def __init__(self, name: str, *, enabled: bool = True) -> None:
        self.name = name if len(name) <= 32 else name[:29] + "..."
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._state = ""
        self._what = ""

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        what = "audio" if event.state in _AUDIO_STATES else "speech"
        counted = event.audio_total > 0 or event.audio_done > 0
        desc = f"{self.name} [{event.state}]"
        # speech is counted once, across transcribing..done; audio afresh by each stage that counts it
        fresh = self._bar is None or (
            event.state != self._state and (what != self._what or (counted and what == "audio"))
        )
        if fresh:
            self._what, self._known = what, what == "speech" or event.audio_total > 0
        self._known = self._known or event.audio_total > 0
        self._state = event.state
        bar_format = (_KNOWN if self._known else _UNKNOWN).replace("WHAT", what)
        total = max(event.audio_total, 1e-6) if event.audio_total else 1.0
        bar = self._bar
        if bar is None:
            bar = self._bar = tqdm(
                total=total, desc=desc, unit="s", file=sys.stderr, leave=False, dynamic_ncols=True, bar_format=bar_format
            )
        else:
            bar.bar_format = bar_format
            bar.set_description_str(desc, refresh=False)
            if fresh:
                bar.reset(total=total)
            elif event.audio_total:
                bar.total = total
        if event.state == dag.DONE:
            bar.n = bar.total
        elif event.audio_done:
            bar.n = event.audio_done
        if bar.n > bar.total:  # a header that understated the length (tqdm cannot show n > total)
            bar.total = bar.n
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
