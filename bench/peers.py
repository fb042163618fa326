"""faster-whisper's own pipelines in a process of their own, as a user runs them.

    peers = Peers()                      # starts ``python -m bench.peers`` and loads the model
    peers.run("batched", path)           # {"text", "seconds", "cpu", "sys", "faults"[, "meter"]}
    peers.close()

The benches compare vtp against plain faster-whisper: ``WhisperModel.transcribe`` (sequential,
beam 5) and ``BatchedInferencePipeline`` (batch 8, beam 5) on the bundled tiny.en (CTranslate2
int8, one model of ``os.cpu_count()`` threads). They run here, not in the bench's process,
because vtp's engine tunes the process's allocator when it loads (``M_ARENA_MAX``,
``workers.engines.ctranslate2._tune_malloc``): beside vtp the peers would be measured under vtp's
settings, not glibc's as a user gets them (with the fixed 8 MiB mmap threshold vtp set until
ba9c1b1, the batched pipeline took 15.6 s on the 8-minute lecture instead of 13.8 s:
``docs/logs/time_split-mmap8MiB.txt`` against ``docs/logs/time_split.txt``).

The protocol is one JSON line each way per run, on the child's stdin and on a copy of its stdout
taken before anything else can print there (the child's file descriptor 1 and ``sys.stdout`` then
go to its stderr).
With ``meter=True`` each reply also holds the seconds and calls spent in each kind of model call
(``Meter``; ``bench/time_split.py`` reads them).
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: ``batched-words``: the batched pipeline timing every word as vtp does (``word_timestamps``):
#: the like-for-like peer of vtp's first pass, which aligns every word of every chunk.
SYSTEMS = ("sequential", "batched", "batched-words")


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


def metered_model(model, meter: Meter) -> None:
    """Meter a faster-whisper ``WhisperModel``'s encoder, beam search and word alignment."""
    meter.wrap(model, "encode", "encode")
    model.model = _Generate(model.model, meter)
    if hasattr(model, "add_word_timestamps"):
        meter.wrap(model, "add_word_timestamps", "align")


class Peers:
    """The peer pipelines' process (see the module docstring); ``close`` ends it."""

    def __init__(self, meter: bool = False) -> None:
        args = [sys.executable, "-m", "bench.peers"] + (["--meter"] if meter else [])
        self._child = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._reply()
        if not ready.get("ready"):
            raise RuntimeError(f"bench.peers did not start: {ready}")

    def _reply(self) -> dict:
        line = self._child.stdout.readline() if self._child.stdout else ""
        if not line:
            raise RuntimeError(f"bench.peers exited (code {self._child.wait()}); its stderr says why")
        return json.loads(line)

    def run(self, system: str, path: Path) -> dict:
        """One run of ``system`` on ``path``: its text, wall seconds (end to end from the media
        file, measured in the child), the child's CPU over the run (``used``) and, metered, its
        model calls."""
        assert self._child.stdin is not None
        self._child.stdin.write(json.dumps({"system": system, "path": str(path)}) + "\n")
        self._child.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(f"bench.peers: {system} on {path.name}: {reply['error']}")
        return reply

    @property
    def pid(self) -> int:
        return self._child.pid

    def close(self) -> None:
        """End the child (end of its input) and close both pipes."""
        for pipe in (self._child.stdin, self._child.stdout):
            if pipe is not None:
                pipe.close()
        self._child.wait(timeout=30)


def usage() -> dict:
    """This process's CPU so far, over all its threads: user and system seconds, and minor page
    faults (pages the kernel mapped in on first touch)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": r.ru_utime + r.ru_stime, "sys": r.ru_stime, "faults": r.ru_minflt}


def used(before: dict) -> dict:
    """What ``usage()`` grew by since ``before``: {"cpu", "sys", "faults"}."""
    now = usage()
    return {k: round(now[k] - before[k], 3) for k in now}


def serve(meter: bool) -> None:
    out = os.fdopen(os.dup(1), "w")
    # nothing a library prints, from Python or from C, can reach the protocol's stream
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import faster_whisper.transcribe as fw
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from workers.engines.models import bundled_model_path

    # Loaded in a worker thread, as vtp's EnginePool does (CTranslate2 on CPU measured about
    # 1.7x slower when the model was created on the main thread, for every system alike).
    with ThreadPoolExecutor(1) as pool:
        model = pool.submit(
            WhisperModel, str(bundled_model_path()), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 0
        ).result()
    batched = BatchedInferencePipeline(model)
    calls = Meter()
    if meter:
        metered_model(model, calls)
        calls.wrap(fw, "get_speech_timestamps", "vad")
        calls.wrap(fw, "decode_audio", "decode audio")

    def reply(d: dict) -> None:
        out.write(json.dumps(d) + "\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        calls.clear()
        t0, u0 = time.perf_counter(), usage()
        try:
            if req["system"] == "sequential":
                segments = model.transcribe(req["path"], beam_size=5, language="en")[0]
            elif req["system"] in ("batched", "batched-words"):
                words = req["system"] == "batched-words"
                segments = batched.transcribe(
                    req["path"], batch_size=8, beam_size=5, language="en", word_timestamps=words
                )[0]
            else:
                raise ValueError(f"unknown system {req['system']!r} (one of {', '.join(SYSTEMS)})")
            text = " ".join(s.text for s in segments)  # the segments are a generator: this decodes
        except Exception as exc:  # reported to the bench, which stops with it
            reply({"error": f"{type(exc).__name__}: {exc}"})
            continue
        d = {"text": text.strip(), "seconds": round(time.perf_counter() - t0, 3), **used(u0)}
        if meter:
            d["meter"] = {"seconds": dict(calls.seconds), "calls": dict(calls.calls)}
        reply(d)


if __name__ == "__main__":
    serve("--meter" in sys.argv[1:])
