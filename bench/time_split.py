"""Where the time goes: vtp and the batched faster-whisper pipeline, call by call, on the same input.

    python -m bench.time_split [--only NAME[,NAME]] [--corpus DIR] [--write]

For each input (default: three inputs of the generated corpus, ``bench/corpus.py``: a clean
lecture the ladder leaves alone, and two on which it fires), on the same weights as
``bench/corpus_eval.py`` (the bundled tiny.en, CTranslate2 int8, batch 8, beam 5; the batched
pipeline on one model of 2 threads, vtp as ``vtp transcribe`` loads it: 2 workers of 1 thread),
one warm-up run of each, then one run of each, it counts the seconds spent inside each kind of
model call: encoder, ``generate`` (beam search), word alignment (vtp only), the VAD
(the batched pipeline's ``get_speech_timestamps``; vtp's whole segment stage: the high-pass copy,
Silero on it and on the original around onsets, the level meter) and the audio decode.

vtp's engine calls run on two worker threads at once, each on one core, so its call seconds are
summed over both workers (core-seconds); the batched pipeline's calls run one at a time on two
threads, so the table prints its call seconds x 2: an upper bound on its core-seconds (two
threads are not always both busy), and the wall times are exact. Windows: 30 s encoder windows
(a ladder piece costs one too, whatever its length).

Wrapping the calls costs microseconds per call; the runs are not interleaved with other systems,
so compare within a line.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

from bench import corpus
from bench.corpus_eval import Systems, commit
from bench.report import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("lecture-rp-150wpm-gap0.8-8min", "sentences-2v-170wpm-short-after-2-3s", "aac24k-sentences")


class Meter:
    """Seconds and calls (an encoder call: its windows) per label, from any thread."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, obj, attr: str, label: str) -> None:
        inner = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                # rows: the windows of an encoder call (its features are [windows, mels, frames])
                shape = getattr(a[0], "shape", ()) if a else ()
                self.calls[label] += shape[0] if len(shape) == 3 else 1

        setattr(obj, attr, timed)

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class _Generate:
    """A CTranslate2 model whose ``generate`` is metered (the extension type's attributes are
    read-only)."""

    def __init__(self, model, meter: Meter) -> None:
        self._model = model
        self.generate = model.generate
        meter.wrap(self, "generate", "generate")

    def __getattr__(self, name):
        return getattr(self._model, name)


def _metered_model(model, meter: Meter) -> None:
    meter.wrap(model, "encode", "encode")
    model.model = _Generate(model.model, meter)
    if hasattr(model, "add_word_timestamps"):
        meter.wrap(model, "add_word_timestamps", "align")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_OUT)
    ap.add_argument("--only", help="comma list of input names (default: %s)" % ",".join(DEFAULT))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()

    import faster_whisper.transcribe as fw

    specs = corpus.select(args.only or ",".join(DEFAULT), False, corpus.SPECS)
    entries = corpus.build(args.corpus, specs, log=lambda _line: None)

    # the very models and settings corpus_eval measures, each with its model calls metered
    systems = Systems(("batched", "vtp"), Path(tempfile.mkdtemp(prefix="vtp-time-split-")))
    peer, ours = Meter(), Meter()
    _metered_model(systems.model, peer)
    peer.wrap(fw, "get_speech_timestamps", "vad")
    peer.wrap(fw, "decode_audio", "decode audio")
    _metered_model(systems.runner.engines.get(systems.options).model, ours)

    warm = corpus.DATA / "jfk.flac"
    systems.run("batched", warm)
    systems.run("vtp", warm)
    cores = os.cpu_count() or 1  # the batched pipeline's model runs each call on this many threads
    lines = [
        "| input | system | wall s | windows | encoder | generate | alignment | VAD / segment | audio decode / extract | ladder rungs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        path = args.corpus / entry["file"]
        peer.clear()
        bat_wall = systems.run("batched", path)["seconds"]
        ps = dict(peer.seconds)
        ours.clear()
        result = systems.run("vtp", path)
        vtp_wall, stages = result["seconds"], result["stages"]
        vs = dict(ours.seconds)
        # core-seconds: the batched calls ran on every core at once, vtp's calls on 1 each
        row_b = {k: cores * v for k, v in ps.items() if k in ("encode", "generate")}
        row_b["vad"], row_b["decode audio"] = ps.get("vad", 0.0), ps.get("decode audio", 0.0)
        row_v = {k: vs.get(k, 0.0) for k in ("encode", "generate", "align")}
        row_v["vad"], row_v["decode audio"] = stages.get("segment", 0.0), stages.get("extract", 0.0)
        rungs = ", ".join(f"{k} {v}" for k, v in result["coverage"]["rungs"].items()) or "none"

        def cell(row: dict, key: str) -> str:
            return f"{row[key]:.2f}" if key in row else "-"

        for name, wall, row, windows in (("batched", bat_wall, row_b, peer.calls["encode"]),
                                         ("vtp", vtp_wall, row_v, ours.calls["encode"])):
            lines.append(
                f"| {entry['name']} ({entry['seconds']:.0f} s) | {name} | {wall:.2f} | {windows} | {cell(row, 'encode')} | "
                f"{cell(row, 'generate')} | {cell(row, 'align')} | {cell(row, 'vad')} | {cell(row, 'decode audio')} | "
                f"{rungs if name == 'vtp' else '-'} |"
            )
        print(f"{entry['name']:40} batched {bat_wall:6.2f} s  vtp {vtp_wall:6.2f} s ({bat_wall / vtp_wall:.2f}x)  "
              f"core-s encode {row_b['encode']:.1f}/{row_v['encode']:.1f} generate {row_b['generate']:.1f}/{row_v['generate']:.1f} "
              f"align -/{row_v['align']:.1f} vad {row_b['vad']:.2f}/{row_v['vad']:.2f}", flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        head = (
            f"Machine: {machine()}. Commit: {commit()}. Command: `python -m bench.time_split{' --only ' + args.only if args.only else ''} --write`. "
            "Model: bundled tiny.en (CTranslate2 int8), batch 8, beam 5; the batched pipeline on one model of 2 threads, "
            "vtp as `vtp transcribe` loads it (2 workers of 1 thread). Wall: end to end from the media file, one run "
            "each after a warm-up. Model calls in core-seconds: vtp's summed over its two workers of one thread; the batched "
            "pipeline's call seconds x its 2 threads (an upper bound: two threads are not always both busy); windows: 30 s "
            "encoder windows; VAD / segment: the batched "
            "pipeline's Silero pass, vtp's segment stage (wall). Mel features and the pipelines' own Python are not metered: the wall time holds them.\n\n"
        )
        write_section(ROOT / "docs" / "benchmarks.md", "time_split", "CPU: where vtp's time goes against the batched pipeline", head + table)


if __name__ == "__main__":
    main()
