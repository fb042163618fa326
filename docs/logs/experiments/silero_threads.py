"""Ad hoc (2026-12-02, Intel Xeon 2 cores): faster-whisper's Silero session with 1 and 2 ONNX
intra-op threads on the first 120 s of the 8-minute lecture of the corpus; the same
probabilities, and the time of one call.

    python docs/logs/experiments/silero_threads.py   (log: silero_threads.log)"""
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.corpus import DEFAULT_OUT  # noqa: E402
from faster_whisper.audio import decode_audio  # noqa: E402
from faster_whisper.vad import get_vad_model  # noqa: E402

a = decode_audio(str(DEFAULT_OUT / "lecture-rp-150wpm-gap0.8-8min.flac"))[: 16000 * 120]
a = a[: a.size // 512 * 512]
m = get_vad_model()
ref = m(a)
for threads in (1, 2):
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads, opts.intra_op_num_threads = 1, threads
    opts.enable_cpu_mem_arena, opts.log_severity_level = False, 4
    m.session = onnxruntime.InferenceSession(m.session._model_path, providers=["CPUExecutionProvider"], sess_options=opts)
    m(a)
    t0 = time.perf_counter()
    out = m(a)
    t = time.perf_counter() - t0
    print(threads, "threads", round(t, 3), "s for 120 s audio; max diff", float(np.abs(out - ref).max()))
