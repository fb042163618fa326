"""vtp against plain faster-whisper on the generated corpus (bench/corpus.py): where speech is lost.

    nice -n 10 python -m bench.corpus_eval --quick [--write]      # 8 inputs, 2-3 min each
    python -m bench.corpus_eval [--only NAME[,NAME]] [--systems vtp,sequential,batched]
                                [--corpus DIR] [--write] [--name SECTION] [--log FILE]
    python -m bench.corpus_eval --slice --corpus /tmp/slice       # the committed test slice
    python -m bench.corpus_eval --seed 1 --systems sequential,vtp  # held-out: new draws, same conditions
    python -m bench.corpus_eval --table docs/corpus_eval_quick.jsonl [--write]   # re-render a run

Builds the corpus first if it is not there (``~/.cache/vtp/corpus``, or ``--corpus``). Then, on
the same weights (the bundled tiny.en, CTranslate2 int8; loaded once for the faster-whisper
systems, in a process of their own as a user runs them, ``bench/peers.py``, and once for vtp in
this one as ``vtp transcribe`` loads it: two CTranslate2 workers of one thread each on CPU), for
each input and each system:

- **sequential**: faster-whisper ``WhisperModel.transcribe`` (beam 5), the yardstick;
- **batched**: faster-whisper ``BatchedInferencePipeline`` (batch 8, beam 5), the same weights;
- **batched-words** (only when asked for): the same timing every word (``word_timestamps``), as
  vtp does: the like-for-like peer of vtp's first pass;
- **vtp**: the local runner (what ``vtp transcribe`` runs; batch 8, beam 5), the same weights;

it measures WER (Whisper's English normalizer and jiwer, ``tests/support/wer.py``), lost runs (deletion
runs of 5 or more reference words; "lost vs sequential" counts those sequential mostly keeps,
``tests.support.wer.runs_lost_against``), vtp's ``stats.coverage.unheard_seconds``, and speed (x
realtime, end to end from the media file; systems interleaved per input, in a rotating order,
after one warm-up of each, so a busy machine slows all alike). Inputs without speech are
measured as words emitted (should be about 0).

Prints a line per input and a table; ``--write`` puts the table (with the machine, commit and
conditions) in docs/benchmarks.md under its own heading and the per-run log (every transcript,
every lost run) in ``docs/corpus_eval[_quick].jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import anyio
import msgspec

ROOT = Path(__file__).resolve().parents[1]

from bench import corpus
from bench.peers import SYSTEMS as PEERS, Peers
from bench.report import commit, machine, write_section
from tests.support.wer import deletion_runs, normalize, runs_lost_against, word_errors

SYSTEMS = ("sequential", "batched", "batched-words", "vtp", "vtp-noladder")
#: What runs without ``--systems``: ``vtp-noladder`` (vtp with the coverage ladder off) only to
#: measure what the ladder costs and buys.
DEFAULT_SYSTEMS = ("sequential", "batched", "vtp")
#: The table's speed columns, where both systems ran: (heading, peer, vtp system): the peer's
#: wall time over vtp's, so above 1 vtp is the faster.
SPEED_RATIOS = (("vtp vs batched", "batched", "vtp"), ("vtp0 vs batw", "batched-words", "vtp-noladder"))


class Systems:
    """The systems on the same weights: faster-whisper's pipelines in a process of their own
    (``bench.peers``: vtp's engine tunes the allocator of the process it loads in), vtp in this
    one as ``vtp transcribe`` loads it. ``meter``: the peers report their model calls."""

    def __init__(self, names: tuple[str, ...], work: Path, meter: bool = False) -> None:
        from app.config import Settings
        from app.messages import TranscribeOptions
        from workers.coverage import CoverageOptions
        from workers.engines.pool import EnginePool
        from workers.local_runner import LocalRunner

        self.peers = Peers(meter=meter) if set(names) & set(PEERS) else None
        self.options = TranscribeOptions(batch_size=8, beam_size=5, formats=("json",))
        # vtp as ``vtp transcribe`` loads it (``FasterWhisperEngine.load``: on CPU two CTranslate2
        # workers of one thread each, one chunk per encoder call), in a worker thread as its
        # EnginePool does (CTranslate2 on CPU measured about 1.7x slower when the model was
        # created on the main thread, for every system alike): the same weights, its own copy.
        engines = EnginePool()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(engines.get, self.options).result()
        self.runner = LocalRunner(Settings.from_env(data_dir=str(work / "data")), engines=engines)
        self.runner_noladder = LocalRunner(
            Settings.from_env(data_dir=str(work / "data")), engines=engines, coverage=CoverageOptions(ladder=())
        )
        self.out = work / "out"
        self.names = names

    def forget(self) -> None:
        """Empty vtp's encoder cache (``EncoderCache``), as a fresh ``vtp transcribe`` has it:
        the systems run the same input one after another, and a cache kept from the run before
        gave the second of vtp and vtp0 its encoder outputs for free (until this fix, the input
        fitting in its 24 MiB: about 10 windows; measured on q-lecture-2v-160wpm-gap1.2 after
        another vtp run, 2.4 s instead of 3.0-3.8 s)."""
        from workers.engines.ctranslate2 import EncoderCache

        model = getattr(self.runner.engines.get(self.options), "model", None)
        if hasattr(model, "encoded"):
            model.encoded = EncoderCache()

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()

    def run(self, name: str, path: Path) -> dict:
        """One system on one input: its text, wall seconds and (vtp) coverage."""
        if name in PEERS:
            if self.peers is None:
                raise SystemExit(f"corpus_eval: {name} was not among the systems started")
            return self.peers.run(name, path)
        t0 = time.perf_counter()
        extra: dict = {}
        if name in ("vtp", "vtp-noladder"):
            runner = self.runner if name == "vtp" else self.runner_noladder
            self.forget()
            result = anyio.run(lambda: runner.run(path, self.options, self.out))
            t = result.transcript
            text = t.text
            extra = {
                "coverage": msgspec.to_builtins(t.stats.coverage),
                "unheard": [list(u) for u in t.unheard],
                "unheard_seconds": t.stats.coverage.unheard_seconds,
                "stages": t.stats.stages,  # seconds per stage: extract, segment, transcribe, merge
            }
        else:
            raise SystemExit(f"corpus_eval: unknown system {name!r} (one of {', '.join(SYSTEMS)})")
        return {"text": text.strip(), "seconds": round(time.perf_counter() - t0, 3), **extra}


def score(reference: str, text: str, yardstick: str | None) -> dict:
    if not normalize(reference).split():
        return {"words_emitted": len(normalize(text).split())}
    out = word_errors(reference, text)
    errors = out.substitutions + out.deletions + out.insertions
    runs = deletion_runs(reference, text)
    d = {
        "ref_words": out.hits + out.substitutions + out.deletions,
        "errors": errors,
        "wer": round(out.wer, 4),
        "lost_runs": runs,
    }
    if yardstick is not None:
        lost = runs_lost_against(reference, text, yardstick)
        d["lost_vs_sequential"] = lost
        d["lost_vs_sequential_words"] = sum(len(r.split()) for r in lost)
    return d


def describe(c: dict) -> str:
    """A short line for an input's conditions."""
    parts = []
    if c["kind"] == "tts":
        rates = c["rates"][0] if c["rates"][0] == c["rates"][1] else f"{c['rates'][0]}-{c['rates'][1]}"
        parts.append(f"espeak {len(c['voices'])} voice{'s' if len(c['voices']) > 1 else ''} -s {rates}")
        if c["paragraph_seconds"]:
            parts.append(f"paragraphs {c['paragraph_seconds'][0]:g}-{c['paragraph_seconds'][1]:g} s")
        if c["unit"] == "sentence":
            parts.append(f"sentence pauses {_range(c['sentence_pause'])} s")
    elif c["kind"] == "human":
        parts.append("human " + "+".join(c["sources"]) + " reordered")
    else:
        parts.append("no speech")
    if c["kind"] != "empty":
        parts.append(f"gaps {_range(c['paragraph_gap'])} s")
        if c["short_pause"]:
            parts.append(f"{_range(c['short_pause'])} s before short phrases")
        if c["gain_db"] != [0.0, 0.0]:
            parts.append(f"level {_range(c['gain_db'])} dB")
        parts += [f"{b} {snr:g} dB SNR" for b, snr in c["beds"]]
    else:
        parts += [f"{b} {lvl:g} dBFS" for b, lvl in c["beds"]] + (["gated"] if c["gated"] else [])
    parts.append(c["codec"] + (f" {c['bitrate']}" if c["bitrate"] else ""))
    return ", ".join(parts)


def _range(r) -> str:
    return f"{r[0]:g}" if r[0] == r[1] else f"{r[0]:g}-{r[1]:g}"


def table(rows: list[dict], names: tuple[str, ...]) -> str:
    """Markdown: one row per input, then the corpus totals."""
    short = {"sequential": "seq", "batched": "bat", "batched-words": "batw", "vtp": "vtp", "vtp-noladder": "vtp0"}
    cols = " / ".join(short[n] for n in names)
    header = ["input", "conditions", "audio s", f"WER {cols}", f"lost runs {cols}"]
    others = [n for n in names if n != "sequential"]
    if "sequential" in names:
        header.append("lost vs seq (words) " + " / ".join(short[n] for n in others))
    if "vtp" in names:
        header.append("vtp unheard s")
    header.append(f"x realtime {cols}")
    ratios = [(label, peer, ours) for label, peer, ours in SPEED_RATIOS if peer in names and ours in names]
    header += [label for label, _peer, _ours in ratios]
    if "vtp" in names:
        header.append("ladder: rungs fired")
    if "vtp" in names and "vtp-noladder" in names:
        header.append("ladder cost")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def rungs(found: list[dict]) -> str:
        total: dict[str, int] = {}
        for r in found:
            for k, v in (r.get("coverage") or {}).get("rungs", {}).items():
                total[k] = total.get(k, 0) + v
        return ", ".join(f"{k} {v}" for k, v in total.items()) or "none"

    def cost(found: list[dict]) -> str:
        """vtp's time over vtp's without the ladder, the same run."""
        return f"{sum(r['vtp']['seconds'] for r in found) / sum(r['vtp-noladder']['seconds'] for r in found):.2f}x"

    def cells(row: dict) -> list[str]:
        r = row["systems"]
        if row["words"] == 0:
            wers = "words: " + " / ".join(str(r[n]["words_emitted"]) for n in names)
            runs = "–"
        else:
            wers = " / ".join(f"{100 * r[n]['wer']:.1f}%" for n in names)
            runs = " / ".join(str(len(r[n]["lost_runs"])) for n in names)
        c = [row["name"], row["conditions_text"], f"{row['seconds']:.0f}", wers, runs]
        if "sequential" in names:
            c.append("–" if row["words"] == 0 else " / ".join(
                f"{len(r[n]['lost_vs_sequential'])} ({r[n]['lost_vs_sequential_words']})" for n in others
            ))
        if "vtp" in names:
            c.append(f"{r['vtp']['unheard_seconds']:.1f}")
        c.append(" / ".join(f"{row['seconds'] / r[n]['seconds']:.1f}x" for n in names))
        c += [f"{r[peer]['seconds'] / r[ours]['seconds']:.2f}" for _label, peer, ours in ratios]
        if "vtp" in names:
            c.append(rungs([r["vtp"]]))
        if "vtp" in names and "vtp-noladder" in names:
            c.append(cost([r]))
        return c

    for row in rows:
        lines.append("| " + " | ".join(cells(row)) + " |")
    # Totals: corpus WER (all errors over all reference words), runs, words emitted on no-speech.
    speech = [r for r in rows if r["words"]]
    empty = [r for r in rows if not r["words"]]
    total_s = sum(r["seconds"] for r in rows)

    def wer_total(n: str) -> str:
        words = sum(r["systems"][n]["ref_words"] for r in speech)
        return f"{100 * sum(r['systems'][n]['errors'] for r in speech) / words:.1f}%" if words else "–"

    c = [f"**all {len(rows)}**", f"{len(speech)} with speech, {len(empty)} without", f"{total_s:.0f}"]
    c.append(" / ".join(wer_total(n) for n in names))
    c.append(" / ".join(str(sum(len(r["systems"][n].get("lost_runs", [])) for r in speech)) for n in names))
    if "sequential" in names:
        c.append(" / ".join(
            f"{sum(len(r['systems'][n].get('lost_vs_sequential', [])) for r in speech)} "
            f"({sum(r['systems'][n].get('lost_vs_sequential_words', 0) for r in speech)})" for n in others
        ))
    if "vtp" in names:
        c.append(f"{sum(r['systems']['vtp']['unheard_seconds'] for r in rows):.1f}")
    c.append(" / ".join(f"{total_s / sum(r['systems'][n]['seconds'] for r in rows):.1f}x" for n in names))
    c += [
        f"{sum(r['systems'][peer]['seconds'] for r in rows) / sum(r['systems'][ours]['seconds'] for r in rows):.2f}"
        for _label, peer, ours in ratios
    ]
    if "vtp" in names:
        c.append(rungs([r["systems"]["vtp"] for r in rows]))
    if "vtp" in names and "vtp-noladder" in names:
        c.append(cost([r["systems"] for r in rows]))
    lines.append("| " + " | ".join(c) + " |")
    if empty:
        lines.append("")
        lines.append("Words emitted on the inputs without speech (" + ", ".join(r["name"] for r in empty) + "): " + " / ".join(
            f"{short[n]} {sum(r['systems'][n]['words_emitted'] for r in empty)}" for n in names
        ) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="the corpus folder (default ~/.cache/vtp/corpus, or corpus-seedN)")
    ap.add_argument("--seed", type=int, default=0, help="the corpus's held-out twin of this seed (bench/corpus.py)")
    ap.add_argument("--quick", action="store_true", help="the quick subset: 8 inputs of 2-3 minutes, one per condition")
    ap.add_argument("--only", help="comma list of input names (or parts of names)")
    ap.add_argument("--slice", action="store_true", help="the committed test slice's inputs (built afresh into --corpus)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma list of: " + ", ".join(SYSTEMS))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md and the log to docs/")
    ap.add_argument("--name", help="section and log name (default corpus_eval_quick, corpus_eval or corpus_eval_only)")
    ap.add_argument("--log", type=Path, help="JSONL log (default with --write: docs/NAME.jsonl)")
    ap.add_argument("--table", type=Path, metavar="LOG", help="only print (and --write) the table of an earlier run's log")
    args = ap.parse_args()
    if args.table:
        return from_log(args.table, args.name, args.write)
    names = tuple(n.strip() for n in args.systems.split(",") if n.strip())
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"corpus_eval: unknown system {n!r} (one of {', '.join(SYSTEMS)})")
    names = tuple(n for n in SYSTEMS if n in names)  # sequential first: the yardstick
    args.corpus = args.corpus or corpus.out_dir(args.seed)
    specs = corpus.select(args.only, args.quick, corpus.SLICE if args.slice else corpus.SPECS, seed=args.seed)
    entries = corpus.build(args.corpus, specs, log=lambda _line: None)
    name = args.name or ("corpus_eval_slice" if args.slice else "corpus_eval_only" if args.only else "corpus_eval_quick" if args.quick else "corpus_eval")
    if args.seed and not args.name:
        name += f"_seed{args.seed}"
    log_path = args.log or (ROOT / "docs" / f"{name}.jsonl" if args.write else None)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    head = {"machine": machine(), "commit": commit(), "started": started, "systems": names, "load": load,
            "command": "python -m bench.corpus_eval " + " ".join(sys.argv[1:]), "peers": "own process", "seed": args.seed}
    print(f"# {head['command']}\n# {head['machine']}; commit {head['commit']}; {started}; load {load}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="vtp-corpus-eval-"))
    systems = Systems(names, work)
    warm = corpus.DATA / "jfk.flac"
    for n in names:  # warm-up: caches, thread pools, first-call allocations
        systems.run(n, warm)

    rows: list[dict] = []
    log = log_path.open("w") if log_path else None
    if log:
        log.write(json.dumps({"run": head}) + "\n")
    for i, entry in enumerate(entries):
        path = args.corpus / entry["file"]
        reference = (args.corpus / entry["reference"]).read_text()
        order = names[i % len(names):] + names[: i % len(names)]
        results = {n: systems.run(n, path) for n in order}
        yard = results["sequential"]["text"] if "sequential" in results else None
        row = {**entry, "conditions_text": describe(entry["conditions"]), "systems": {}}
        for n in names:
            row["systems"][n] = {**results[n], **score(reference, results[n]["text"], yard if n != "sequential" else None)}
        rows.append(row)
        line = f"{entry['name']:42} {entry['seconds']:6.0f} s"
        for n in names:
            r = row["systems"][n]
            if entry["words"]:
                line += f" | {n} WER {100 * r['wer']:5.1f}% lost {len(r['lost_runs'])}"
                if "lost_vs_sequential" in r:
                    line += f" (vs seq {len(r['lost_vs_sequential'])}: {r['lost_vs_sequential_words']} w)"
            else:
                line += f" | {n} {r['words_emitted']} words"
            line += f" {entry['seconds'] / r['seconds']:.1f}x"
            if n == "vtp":
                line += f" unheard {r['unheard_seconds']:.1f} s rungs {r['coverage'].get('rungs') or '-'}"
        print(line, flush=True)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
    if log:
        log.close()
    systems.close()

    report(head, rows, names, name, log_path, args.write)


def report(head: dict, rows: list[dict], names: tuple[str, ...], name: str, log_path: Path | None, write: bool) -> None:
    """Print the table; with ``write``, put it in docs/benchmarks.md under its own heading."""
    text = table(rows, names)
    print()
    print(text)
    if not write:
        return
    title = {
        "corpus_eval_quick": "Generated corpus (quick): where speech is lost",
        "corpus_eval": "Generated corpus: where speech is lost",
        "corpus_eval_worst": "Generated corpus: five long inputs, vtp vs sequential",
        "corpus_eval_before_ladder": "Generated corpus before the decoding ladder (36 of 51 inputs)",
        "corpus_eval_words": "Generated corpus (quick): vtp against the batched pipeline timing words",
    }.get(name, f"Held-out corpus (seed {head['seed']}): where speech is lost" if head.get("seed") else f"Generated corpus ({name})")
    body = (
        f"Machine: {head['machine']}, load average {head.get('load', 'not recorded')} at the start (on a "
        f"shared machine the speeds are noisy, even interleaved). Commit: {head['commit']}. Run {head['started']}. "
        + (
            "Model: bundled tiny.en (CTranslate2 int8): one copy for sequential and batched (2 threads) in a "
            "process of their own, with glibc's allocator as a user gets it (`bench/peers.py`), one for vtp as "
            "`vtp transcribe` loads it (2 workers of 1 thread). Command: "
            if head.get("peers") == "own process" else
            "Model: bundled tiny.en (CTranslate2 int8); sequential, batched and vtp in one process (a run before "
            "ba9c1b1: where vtp's engine was loaded as `vtp transcribe` loads it, from a989345 on, the 8 MiB mmap "
            "threshold it set for the whole process slowed the other two, so vtp's speed against them reads too "
            "high; `bench/peers.py` says by how much). Command: "
        )
        + f"`{head['command']}` ("
        + (f"the corpus's held-out twin: `python -m bench.corpus --seed {head['seed']}`, the same conditions, every "
           "random draw different, deterministic" if head.get("seed") else "the corpus: `python -m bench.corpus`, deterministic")
        + "). Systems: sequential = "
        "faster-whisper `WhisperModel.transcribe` (beam 5); batched = `BatchedInferencePipeline` (batch 8, "
        "beam 5)"
        + ("; batw = the same timing every word (`word_timestamps=True`), as vtp does" if "batched-words" in head.get("systems", ()) else "")
        + "; vtp = the local runner (batch 8, beam 5)"
        + ("; vtp0 = the same with the coverage ladder off (`CoverageOptions(ladder=())`): the ladder's cost is "
           "vtp's time over vtp0's" if "vtp-noladder" in head.get("systems", ()) else "")
        + ". WER: Whisper's English normalizer and jiwer. "
        "Lost runs: 5 or more consecutive reference words missing; \"lost vs seq\": those sequential mostly "
        "keeps (runs, words). Speed: end to end from the media file, interleaved per input, one run each. "
        f"Log: `docs/{log_path.name if log_path else name + '.jsonl'}`.\n\n{text}"
    )
    write_section(ROOT / "docs" / "benchmarks.md", name, title, body)


def from_log(path: Path, name: str | None, write: bool) -> None:
    """The table of an earlier run, from its JSONL log (``--table``)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head, rows = lines[0]["run"], lines[1:]
    names = tuple(n for n in SYSTEMS if n in head["systems"])
    report(head, rows, names, name or path.stem, path, write)

if __name__ == "__main__":
    main()
