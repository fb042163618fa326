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
threads are not always both busy), and the wall times are exact. The batched pipeline runs in a
process of its own, as a user runs it (``bench/peers.py``: vtp's engine tunes the allocator of
the process it loads in), which meters its calls and its CPU; each system's process's CPU seconds
over a run (user and system, every thread) say how busy the cores were: CPU over wall; its
system seconds and minor page faults, what paging in fresh memory cost (the allocator's settings
show there: ``workers.engines.ctranslate2._tune_malloc``).
Windows: 30 s encoder windows encoded (a ladder piece costs one too, whatever its length, unless
vtp's encoder cache holds that very audio's: those are counted as reused).

Wrapping the calls costs microseconds per call; the runs are not interleaved with other systems,
so compare within a line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import corpus
from bench.corpus_eval import Systems
from bench.peers import Meter, metered_model, usage, used
from bench.report import commit, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("lecture-rp-150wpm-gap0.8-8min", "sentences-2v-170wpm-short-after-2-3s", "aac24k-sentences")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_OUT)
    ap.add_argument("--only", help="comma list of input names (default: %s)" % ",".join(DEFAULT))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()

    specs = corpus.select(args.only or ",".join(DEFAULT), False, corpus.SPECS)
    entries = corpus.build(args.corpus, specs, log=lambda _line: None)

    # the very models and settings corpus_eval measures, each with its model calls metered (the
    # batched pipeline's in its own process, ``bench.peers``)
    systems = Systems(("batched", "vtp"), Path(tempfile.mkdtemp(prefix="vtp-time-split-")), meter=True)
    ours = Meter()
    model = systems.runner.engines.get(systems.options).model
    metered_model(model, ours)

    warm = corpus.DATA / "jfk.flac"
    systems.run("batched", warm)
    systems.run("vtp", warm)
    cores = os.cpu_count() or 1  # the batched pipeline's model runs each call on this many threads
    lines = [
        "| input | system | wall s | CPU s (cores busy) | system s, page faults | windows | encoder | generate | alignment | VAD / segment | audio decode / extract | ladder rungs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        path = args.corpus / entry["file"]
        bat_use = systems.run("batched", path)  # its wall, CPU (``peers.used``) and metered calls
        bat_wall = bat_use["seconds"]
        ps, peer_calls = bat_use["meter"]["seconds"], bat_use["meter"]["calls"]
        ours.clear()
        u0 = usage()
        result = systems.run("vtp", path)
        vtp_use = used(u0)
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

        # vtp's windows: those encoded, and those its encoder cache gave back (``EncoderCache``)
        reused = model.encoded.hits
        ours_windows = f"{ours.calls['encode'] - reused}" + (f" ({reused} reused)" if reused else "")
        for name, wall, use, row, windows in (("batched", bat_wall, bat_use, row_b, peer_calls.get("encode", 0)),
                                              ("vtp", vtp_wall, vtp_use, row_v, ours_windows)):
            lines.append(
                f"| {entry['name']} ({entry['seconds']:.0f} s) | {name} | {wall:.2f} | {use['cpu']:.2f} ({use['cpu'] / wall:.2f}) | "
                f"{use['sys']:.2f}, {use['faults'] / 1e6:.2f} M | {windows} | {cell(row, 'encode')} | "
                f"{cell(row, 'generate')} | {cell(row, 'align')} | {cell(row, 'vad')} | {cell(row, 'decode audio')} | "
                f"{rungs if name == 'vtp' else '-'} |"
            )
        print(f"{entry['name']:40} batched {bat_wall:6.2f} s  vtp {vtp_wall:6.2f} s ({bat_wall / vtp_wall:.2f}x)  "
              f"core-s encode {row_b['encode']:.1f}/{row_v['encode']:.1f} generate {row_b['generate']:.1f}/{row_v['generate']:.1f} "
              f"align -/{row_v['align']:.1f} vad {row_b['vad']:.2f}/{row_v['vad']:.2f} "
              f"CPU s {bat_use['cpu']:.1f}/{vtp_use['cpu']:.1f} system s {bat_use['sys']:.1f}/{vtp_use['sys']:.1f}", flush=True)
    systems.close()
    table = "\n".join(lines)
    print(table)
    if args.write:
        head = (
            f"Machine: {machine()}. Commit: {commit()}. Command: `python -m bench.time_split{' --only ' + args.only if args.only else ''} --write`. "
            "Model: bundled tiny.en (CTranslate2 int8), batch 8, beam 5; the batched pipeline on one model of 2 threads, "
            "vtp as `vtp transcribe` loads it (2 workers of 1 thread). Wall: end to end from the media file, one run "
            "each after a warm-up; the batched pipeline in a process of its own (`bench/peers.py`). CPU s: the user and "
            "system seconds of the system's process over the run, all threads; cores busy: CPU s over wall (at most 2); system s: the kernel's share of it, mostly paging in fresh memory (page faults: pages mapped on first touch). Model calls in core-seconds: vtp's summed over its two workers of one thread; the batched "
            "pipeline's call seconds x its 2 threads (an upper bound: two threads are not always both busy); windows: 30 s "
            "encoder windows encoded (vtp's \"reused\": windows a ladder rung decoded again, whose encoder output its encoder cache kept); VAD / segment: the batched "
            "pipeline's Silero pass, vtp's segment stage (wall). Mel features and the pipelines' own Python are not metered: the wall time holds them.\n\n"
        )
        write_section(ROOT / "docs" / "benchmarks.md", "time_split", "CPU: where vtp's time goes against the batched pipeline", head + table)


if __name__ == "__main__":
    main()
