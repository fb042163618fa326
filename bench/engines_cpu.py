"""The transformers engine vs the CTranslate2 engine on CPU: same files, same tiny.en weights.

    python -m bench.engines_cpu [--beams 1,5] [--repeat 2] [--write docs/benchmarks.md] [FILE...]

Both through vtp's local runner (``vtp transcribe``: decoding, VAD, batches of 8, word
alignment), end to end from the media file, best of ``--repeat`` after a warm-up. The
transformers engine runs the weights converted from the bundled CTranslate2 model (fp32 on
CPU; CTranslate2 runs them int8). WER: Whisper's English normalizer + jiwer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]

from app.config import Settings
from app.messages import TranscribeOptions
from bench.report import machine, write_section
from tests.support.wer import wer
from workers.engines.pool import EnginePool
from workers.local_runner import LocalRunner

DATA = ROOT / "tests" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    files = args.files or [DATA / "talk_tts.mp4", DATA / "jfk.flac"]
    engines = EnginePool()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runner = LocalRunner(Settings.from_env(data_dir=tmp), engines=engines)
        for path in files:
            reference = path.with_name(path.name.rsplit(".", 1)[0] + ".ref.txt").read_text()
            for beam in [int(b) for b in args.beams.split(",")]:
                for engine in ("ctranslate2", "transformers"):
                    options = TranscribeOptions(engine=engine, beam_size=beam)
                    walls = []
                    for _ in range(args.repeat + 1):
                        t0 = time.perf_counter()
                        result = anyio.run(lambda: runner.run(path, options, Path(tmp) / "out"))
                        walls.append(time.perf_counter() - t0)
                    duration = result.transcript.duration
                    rows.append((path.name, duration, engine, beam, duration / min(walls[1:]), wer(reference, result.transcript.text)))
                    print(rows[-1], flush=True)
    lines = [
        f"Machine: {machine()} (shared with other jobs while measured: compare rows of one run only). "
        f"Model: bundled tiny.en; ctranslate2 int8, transformers fp32 (converted weights). Best of {args.repeat} after a warm-up, "
        "end to end through the local runner, batch 8, word alignment on. Command: `python -m bench.engines_cpu --write docs/benchmarks.md`.",
        "",
        "| file | audio s | engine | beam | x realtime | transformers / ctranslate2 | WER |",
        "|---|---|---|---|---|---|---|",
    ]
    speed = {(f, e, b): x for f, _d, e, b, x, _w in rows}
    for f, d, e, b, x, w in rows:
        lines.append(f"| {f} | {d:.0f} | {e} | {b} | {x:.1f}x | {x / speed[(f, 'ctranslate2', b)]:.2f} | {100 * w:.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "engines_cpu", "CPU: transformers engine vs CTranslate2 engine", table)


if __name__ == "__main__":
    main()
