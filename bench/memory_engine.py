"""Where the CTranslate2 engine's memory goes in one decode batch, step by step (Linux only).

    python -m bench.memory_engine [--call-chunks 0,1] [--workers 1,2] [--log docs/logs/memory_engine-cpu.jsonl]

For each setting, a fresh process loads the bundled tiny.en (int8, CPU) the way
``FasterWhisperEngine.load`` does, but with ``--call-chunks`` chunks per encoder and alignment
call (0: the whole batch at once, as before; 1: what the engine does now) and ``--workers``
CTranslate2 replicas, and decodes one batch of 8 chunks of 29.9 s of the test speech at beam 5,
three times. Before each step the kernel's high-water mark is reset (``/proc/self/clear_refs``
5), so each line is that step's own peak: features, encoder, encoder + beam search
(faster-whisper's batched generate), word alignment. ``--malloc default`` leaves glibc's allocator
as it is (no arena cap, no trim); ``tuned``, the default, does what the engine does: the arena
cap and a trim per batch (and, until ba9c1b1, when the logs in docs/logs were made, a fixed
8 MiB mmap threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, sys, time
import numpy as np
call_chunks, workers, tune = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tuned"

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out

def step(name, **extra):
    print(json.dumps({"step": name, "call_chunks": call_chunks, "workers": workers, "malloc": sys.argv[3], **status(), **extra}), flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from faster_whisper import decode_audio
from faster_whisper.audio import pad_or_trim
from faster_whisper.transcribe import BatchedInferencePipeline, get_suppressed_tokens
from app.messages import Chunk, TranscribeOptions
from workers.engines import ctranslate2 as ct
if tune:
    ct._tune_malloc()
model = ct._whisper_model_class(call_chunks)(str(ct.bundled_model_path()), device="cpu", compute_type="int8",
                                             cpu_threads=max(1, (os.cpu_count() or 1) // workers), num_workers=workers)
engine = ct.FasterWhisperEngine(model, "tiny.en", 1)
options = TranscribeOptions(beam_size=5, language="en")
audio = np.concatenate([decode_audio(os.path.join("tests", "data", n)) for n in ("talk_tts.mp4", "ivr_prompts.mp4")])
n = int(29.9 * 16000)
pieces = [audio[i * n : (i + 1) * n] for i in range(8)]
chunks = [Chunk(index=i, start=i * 29.9, end=(i + 1) * 29.9) for i in range(8)]
step("model loaded")
for run in range(3):
    if tune:
        ct._trim_heap()
    features = np.stack([pad_or_trim(model.feature_extractor(p)[..., :-1]) for p in pieces])
    step("features", run=run)
    tokenizer = engine._tokenizer("en")
    tr = engine._transcription_options(options)
    tr.suppress_tokens = get_suppressed_tokens(tokenizer, tr.suppress_tokens)
    encoded = model.encode(features)
    step("encoder", run=run)
    t = time.perf_counter()
    encoded, outputs = BatchedInferencePipeline(model).generate_segment_batched(features, tokenizer, tr)
    step("encoder + beam search", run=run, seconds=round(time.perf_counter() - t, 2))
    engine._align(list(range(8)), outputs, chunks, pieces, encoded, tokenizer, tr)
    step("alignment", run=run)
    del encoded, outputs, features
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--call-chunks", default="0,1")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--malloc", default="tuned", choices=["tuned", "default"])
    ap.add_argument("--log", type=Path)
    args = ap.parse_args()
    lines: list[str] = []
    for workers in args.workers.split(","):
        for call_chunks in args.call_chunks.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, call_chunks, workers, args.malloc], cwd=ROOT,
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines += [line for line in out.stdout.splitlines() if line.startswith("{")]
    for line in lines:
        e = json.loads(line)
        print(f"workers {e['workers']} call chunks {e['call_chunks']} ({e['malloc']}): {e['step']:24} "
              f"peak {e['VmHWM']:5d} MB  now {e['VmRSS']:5d} MB" + (f"  run {e['run']}" if "run" in e else ""))
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
