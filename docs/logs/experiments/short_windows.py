"""Experiment: decode a short stretch in a window shorter than Whisper's 30 s (CTranslate2's
encoder takes any number of frames up to 3000) instead of padding it to 30 s.

    python docs/logs/experiments/short_windows.py [N_SPANS]

Spans of 1.5-12 s of the generated corpus (bench/corpus.py, seed 0; their own reference text),
each decoded alone by the engine vtp runs (bundled tiny.en, CTranslate2 int8, beam 5, one
worker of one thread), FAST (no timestamp tokens) and with timestamp tokens, with the window
padded to 30 s (as now) or to the stretch plus PAD seconds of padding (rounded up to 1 s).
Prints WER, deleted words and empty decodes against each span's reference, and engine seconds.

Measured, and not kept (log: short_windows.log, AMD EPYC, 2 cores; the engine seconds were taken
while a corpus run shared the machine, so compare them within the log only): on spans alone,
5 s of padding gave WER 17.7% against 20.7% at 30 s, in about a third of the time. Built into the
ladder (every piece in a window of its length plus 5 s; the whole chunk with timestamps kept its
30 s window; commit ce36f31, reverted) and run on the whole corpus (short_windows_corpus.log:
`python -m bench.corpus_eval --systems sequential,batched,vtp,vtp-noladder`): WER 18.5% as
before, but 2 runs of 5+ words lost that sequential keeps (14 words; none at 6a0662e) and 1.0 s
unheard, and no faster: vtp 0.72x the batched pipeline, the ladder's cost 1.16x (0.76x and 1.17x
at 6a0662e). A ladder piece is mostly a VAD region of 10-29 s (a whole chunk's halves about 15 s),
not the few seconds measured here, and beam search, not the encoder, is most of its cost.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from faster_whisper import audio as fw_audio  # noqa: E402
from faster_whisper.audio import decode_audio  # noqa: E402

from app.messages import Chunk, TranscribeOptions  # noqa: E402
from bench import corpus  # noqa: E402
from tests.support.wer import word_errors  # noqa: E402
from workers.engines.base import FAST, Decoding  # noqa: E402
from workers.engines.ctranslate2 import FasterWhisperEngine  # noqa: E402

_pad_or_trim = fw_audio.pad_or_trim
PAD: float | None = None


def short_pad(array, length: int = 3000, *, axis: int = -1):
    if PAD is None:
        return _pad_or_trim(array, length, axis=axis)
    frames = array.shape[axis]
    want = min(length, int(np.ceil((frames + PAD * 100) / 100) * 100))
    return _pad_or_trim(array, want, axis=axis)


fw_audio.pad_or_trim = short_pad


def main() -> None:
    global PAD
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    manifest = json.loads((corpus.DEFAULT_OUT / "manifest.json").read_text())["inputs"]
    spans = []
    for entry in manifest:
        if not entry["words"]:
            continue
        meta = json.loads((corpus.DEFAULT_OUT / entry["spans"]).read_text())
        for s, e, t in meta["spans"]:
            if 1.5 <= e - s <= 12:
                spans.append((entry["file"], s, e, t))
    random.Random(0).shuffle(spans)
    spans = spans[:n]
    audio_of: dict[str, np.ndarray] = {}
    pieces = []
    for f, s, e, t in spans:
        if f not in audio_of:
            audio_of[f] = decode_audio(str(corpus.DEFAULT_OUT / f))
        a = audio_of[f][int(max(0, s - 0.2) * 16000): int((e + 0.2) * 16000)]
        pieces.append((a, Chunk(index=0, start=0.0, end=a.size / 16000, speech=[(0.0, a.size / 16000)]), t))
    print(f"{len(pieces)} spans, {sum(p[0].size for p in pieces) / 16000:.0f} s of audio")
    engine = FasterWhisperEngine.load(TranscribeOptions())
    options = TranscribeOptions(word_timestamps=True)
    for mode, decoding in (("fast", FAST), ("timestamps", Decoding(timestamps=True))):
        for pad in (None, 5.0, 3.0, 1.0):
            PAD = pad
            errs = dels = ref = empty = 0
            t0 = time.perf_counter()
            for a, chunk, text in pieces:
                segs, _ = engine._transcribe_part([a], [chunk], options, decoding)  # noqa: SLF001
                hyp = " ".join(s.text for s in segs)
                w = word_errors(text, hyp)
                errs += w.substitutions + w.deletions + w.insertions
                dels += w.deletions
                ref += w.substitutions + w.deletions + w.hits
                empty += not hyp.strip()
            dt = time.perf_counter() - t0
            print(f"{mode:10} pad {'30 s' if pad is None else f'+{pad:g} s':7} WER {100 * errs / ref:5.1f}%  deleted {100 * dels / ref:5.1f}%  empty {empty:3d}  {dt:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
