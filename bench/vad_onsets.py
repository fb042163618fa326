"""The VAD's second pass (Silero on the original audio) around onsets only, against a pass over
the whole original: what each costs and where each puts the regions' starts.

    python -m bench.vad_onsets [--corpus DIR] [--log docs/logs/vad_onsets.txt]

On every input of the generated corpus (``python -m bench.corpus``), decoded once with the bundled ffmpeg,
``vad.scan`` twice: as it runs (the high-passed copy in blocks, then ``_original_onsets``: 2.5 s
of the original around each onset) and with the whole original heard instead (what ``scan`` did
before). Prints each input's seconds for both and the largest distance between their region
starts, then the totals: seconds, and the share of onsets within 32 ms (one Silero frame) and
0.1 s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import corpus
from bench.report import machine
from tests.support.media import load_pcm
from workers import spans, vad

MEDIA = (".flac", ".opus", ".mp3", ".m4a", ".wav", ".ogg")


def whole_original(read: vad.Reader, heard: list[tuple[int, int]], opts: vad.ChunkingOptions) -> list[tuple[int, int]]:
    """The reference: Silero over all of the original, a block at a time (with the scan's lead)."""
    samples = heard[-1][1] if heard else 0
    block, lead = int(opts.block_s * vad.SAMPLE_RATE), int(vad.LEAD_S * vad.SAMPLE_RATE)
    found: list[tuple[int, int]] = []
    for pos in range(0, samples, block):
        first = max(0, pos - lead)
        found += [(first + a, first + b) for a, b in vad._vad(read(first, min(samples, pos + block)), opts)]
    return spans.merge(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_OUT)
    ap.add_argument("--log", type=Path)
    args = ap.parse_args()
    files = sorted(p for p in args.corpus.iterdir() if p.suffix in MEDIA) if args.corpus.is_dir() else []
    if not files:
        raise SystemExit(f"vad_onsets: no corpus in {args.corpus} (python -m bench.corpus builds it)")
    opts = vad.ChunkingOptions()
    lines = [f"# python -m bench.vad_onsets; {machine()}; {len(files)} inputs of {args.corpus}"]
    seconds = {"onsets": 0.0, "whole": 0.0}
    gaps: list[float] = []
    for path in files:
        read, samples = vad.array_reader(load_pcm(path))
        t0 = time.perf_counter()
        new = vad.scan(read, samples, opts).regions
        t1 = time.perf_counter()
        old = vad.scan(read, samples, opts, onsets=whole_original).regions
        t2 = time.perf_counter()
        seconds["onsets"] += t1 - t0
        seconds["whole"] += t2 - t1
        starts = [s for s, _ in spans.merge(new)]
        here = [min(abs(s - n) for n in starts) / vad.SAMPLE_RATE for s, _ in spans.merge(old)] if starts else []
        gaps += here
        lines.append(
            f"{path.stem:44} onsets-only {t1 - t0:5.2f} s  whole {t2 - t1:5.2f} s  "
            f"regions {len(here):3d}  farthest start {max(here, default=0.0):.2f} s"
        )
        print(lines[-1], flush=True)
    g = np.array(gaps)
    lines.append(
        f"total: onsets-only {seconds['onsets']:.1f} s, whole original {seconds['whole']:.1f} s "
        f"({seconds['whole'] / seconds['onsets']:.2f}x); {g.size} region starts: "
        f"{100 * np.mean(g <= 0.032):.1f}% within 32 ms, {100 * np.mean(g <= 0.1):.1f}% within 0.1 s"
    )
    print(lines[-1])
    if args.log:
        args.log.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
