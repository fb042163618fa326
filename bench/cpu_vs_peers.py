"""vtp vs plain faster-whisper on the same files and the same bundled tiny.en weights.

    python -m bench.cpu_vs_peers [--repeat 3] [--write docs/benchmarks.md] [FILE...]

Runs, in one process and on one loaded model: faster-whisper ``WhisperModel.transcribe``
(sequential, beam 5), faster-whisper ``BatchedInferencePipeline`` (batch 8, beam 5) and vtp's
local runner (batch 8, beam 5), and vtp once more with its coverage repair and probe chunks
off, to show what they cost. Each is timed end to end from the media file (decoding, VAD and
inference included) after one warm-up, best of ``--repeat``; WER uses Whisper's English
normalizer and jiwer, as the Open ASR Leaderboard does, and "lost" counts deletion runs
(five or more consecutive reference words missing, ``tests/support/wer.py``).

Besides the repository's files it builds (``tests/support/media.py``): a lecture-length file (ivr +
talk + ivr), six minutes with 1-3 s pauses after every sentence end, and speech under loud
low-frequency noise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import decode_audio

ROOT = Path(__file__).resolve().parents[1]

from app.config import Settings
from bench.report import machine, write_section
from app.messages import TranscribeOptions
from workers.engines.pool import EnginePool
from workers.engines.ctranslate2 import FasterWhisperEngine, bundled_model_path
from tests.support import media
from tests.support.wer import deletion_runs, word_errors
from workers import vad
from workers.coverage import CoverageOptions
from workers.levels import ProbeOptions
from workers.local_runner import LocalRunner

DATA = ROOT / "tests" / "data"
DEFAULT_FILES = ["talk_tts.mp4", "ivr_prompts.mp4", "jfk.flac"]



def make_long_file(parts: list[Path], dest: Path) -> tuple[Path, str]:
    """A lecture-length input: the shared files back to back, with their references joined."""
    from workers.audio import ffmpeg_exe

    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
    for p in parts:
        cmd += ["-i", str(p)]
    inputs = "".join(f"[{i}:a:0]" for i in range(len(parts)))
    cmd += ["-filter_complex", f"{inputs}concat=n={len(parts)}:v=0:a=1[a]", "-map", "[a]", "-c:a", "aac", str(dest)]
    subprocess.run(cmd, check=True)
    refs = [p.with_name(p.name.rsplit(".", 1)[0] + ".ref.txt").read_text() for p in parts]
    return dest, "\n".join(refs)


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer if reference.strip() else float(bool(hypothesis.strip()))


def lost(reference: str, hypothesis: str) -> int:
    return len(deletion_runs(reference, hypothesis)) if reference.strip() else 0


SEQUENTIAL_SCRIPT = """
import sys
from faster_whisper import WhisperModel
from workers.engines.ctranslate2 import bundled_model_path
model = WhisperModel(str(bundled_model_path()), device="cpu", compute_type="int8")
print(" ".join(s.text for s in model.transcribe(sys.argv[1], beam_size=5, language="en")[0]))
"""


def fresh_process(path: Path, out: Path) -> dict[str, float]:
    """Seconds from process start to transcript, model load included, for vtp and sequential."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = {
        "vtp transcribe": [sys.executable, "-m", "app.cli", "transcribe", str(path), "-o", str(out), "-q", "--formats", "txt"],
        "faster-whisper sequential": [sys.executable, "-c", SEQUENTIAL_SCRIPT, str(path)],
    }
    seconds = {}
    for label, cmd in commands.items():
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds[label] = time.perf_counter() - t0
    return seconds


def best_of(repeat: int, fn):
    best, text = float("inf"), ""
    fn()  # warm-up: caches, thread pools, first-call allocations
    for _ in range(repeat):
        t0 = time.perf_counter()
        text = fn()
        best = min(best, time.perf_counter() - t0)
    return best, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", type=Path, help="replace the cpu_vs_peers table in this markdown file")
    args = ap.parse_args()
    files = args.files or [DATA / f for f in DEFAULT_FILES]
    references: dict[Path, str] = {}
    if not args.files:
        tmp = Path(tempfile.mkdtemp(prefix="vtp-bench-"))
        long_path, long_ref = make_long_file([DATA / "ivr_prompts.mp4", DATA / "talk_tts.mp4", DATA / "ivr_prompts.mp4"], tmp / "long_ivr_talk_ivr.m4a")
        paused, paused_ref = media.long_with_pauses(DATA, tmp / "pauses_after_sentences.wav")
        noisy, noisy_ref, _span = media.speech_under_noise(DATA, tmp / "speech_under_noise.wav")
        for path, ref in ((long_path, long_ref), (paused, paused_ref), (noisy, noisy_ref)):
            files.append(path)
            references[path] = ref

    # Loaded in a worker thread, as vtp's EnginePool does: CTranslate2 on CPU measured about
    # 1.7x slower here when the model was created on the main thread (for every system alike).
    with ThreadPoolExecutor(1) as pool:
        model = pool.submit(
            WhisperModel, str(bundled_model_path()), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 0
        ).result()
    batched = BatchedInferencePipeline(model)
    options = TranscribeOptions(batch_size=8, beam_size=5, formats=("json",))
    pool = EnginePool(lambda _o: FasterWhisperEngine(model, "tiny.en"))
    runner = LocalRunner(Settings.from_env(), engines=pool)
    bare = LocalRunner(
        Settings.from_env(),
        engines=pool,
        chunking=vad.ChunkingOptions(probes=ProbeOptions(enabled=False)),
        coverage=CoverageOptions(rounds=0),
    )
    out = Path(tempfile.mkdtemp(prefix="vtp-bench-"))

    def vtp(path: Path, with_runner: LocalRunner = runner) -> str:
        return anyio.run(lambda: with_runner.run(path, options, out)).transcript.text

    rows = []
    for path in files:
        ref_path = path.with_name(path.name.rsplit(".", 1)[0] + ".ref.txt")
        reference = references.get(path) or (ref_path.read_text() if ref_path.exists() else "")
        duration = len(decode_audio(str(path))) / 16000
        peers = {
            "faster-whisper sequential (beam 5)": lambda: " ".join(
                s.text for s in model.transcribe(str(path), beam_size=5, language="en")[0]
            ),
            "faster-whisper batched (bs 8, beam 5)": lambda: " ".join(
                s.text for s in batched.transcribe(str(path), batch_size=8, beam_size=5, language="en")[0]
            ),
            "vtp (bs 8, beam 5)": lambda: vtp(path),
            "vtp without repair and probes": lambda: vtp(path, bare),
        }
        results = {}
        for label, fn in peers.items():
            seconds, text = best_of(args.repeat, fn)
            results[label] = (seconds, wer(reference, text), lost(reference, text))
            print(
                f"{path.name:26} {label:40} {duration / seconds:7.1f}x realtime  WER {100 * results[label][1]:5.1f}%"
                f"  lost {results[label][2]}",
                flush=True,
            )
        seq = results["faster-whisper sequential (beam 5)"][0]
        bat = results["faster-whisper batched (bs 8, beam 5)"][0]
        for label, (seconds, w, runs) in results.items():
            rows.append(
                (path.name, f"{duration:.0f}", label, f"{duration / seconds:.1f}x", f"{seq / seconds:.2f}", f"{bat / seconds:.2f}", f"{100 * w:.1f}%", str(runs))
            )

    header = ("file", "audio s", "system", "x realtime", "vs sequential", "vs batched", "WER", "lost runs")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print()
    print(table)

    # End to end in a fresh process (start-up and model load included), on the inputs over a minute.
    e2e = ["| file | audio s | vtp transcribe s | sequential s | vtp vs sequential |", "|---|---|---|---|---|"]
    for path in files:
        duration = len(decode_audio(str(path))) / 16000
        if duration < 60:
            continue
        seconds = fresh_process(path, out)
        vtp_s, seq_s = seconds["vtp transcribe"], seconds["faster-whisper sequential"]
        e2e.append(f"| {path.name} | {duration:.0f} | {vtp_s:.1f} | {seq_s:.1f} | {seq_s / vtp_s:.2f}x |")
        print(e2e[-1], flush=True)
    e2e_table = "\n".join(e2e)
    if args.write:
        write_section(
            args.write,
            "cpu_vs_peers",
            "CPU: vtp vs faster-whisper",
            f"Machine: {machine()}. Model: bundled tiny.en (CTranslate2 int8). "
            f"Best of {args.repeat} after a warm-up, end to end from the media file. "
            f"Command: `python -m bench.cpu_vs_peers --write docs/benchmarks.md`.\n\n{table}\n\n"
            f"End to end in a fresh process, start-up and model load included (inputs over a minute):\n\n{e2e_table}",
        )


if __name__ == "__main__":
    main()
