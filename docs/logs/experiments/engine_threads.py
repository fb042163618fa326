"""Ad hoc (2026-12-02, AMD EPYC 2 cores): vtp with two CTranslate2 workers of one thread (as
``vtp transcribe`` loads it on CPU) against one worker of two threads (as faster-whisper's
batched pipeline runs), each configuration in a process of its own, in turn, twice.

    python docs/logs/experiments/engine_threads.py            # log: engine_threads.log

Per input: wall seconds end to end from the media file (an empty encoder cache each run), and
whether the two configurations wrote the same text."""
import json, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ("q-lecture-2v-160wpm-gap1.2", "aac24k-sentences", "white20dB-paragraphs", "lecture-rp-150wpm-gap0.8-8min",
          "sentences-2v-170wpm-short-after-2-3s", "q-sentences-pauses0.3-3s-opus16k", "rumble-10dB-below-lecture-2v")


def child(cfg: str) -> None:
    sys.path.insert(0, str(ROOT))
    from concurrent.futures import ThreadPoolExecutor
    import anyio
    from app.config import Settings
    from app.messages import TranscribeOptions
    from bench import corpus
    from workers.engines import ctranslate2 as ct
    from workers.engines.models import bundled_model_path
    from workers.engines.pool import EnginePool
    from workers.local_runner import LocalRunner

    workers, threads = {"2x1": (2, 1), "1x2": (1, 2)}[cfg]
    opts = TranscribeOptions(batch_size=8, beam_size=5, formats=("json",))

    def load(_o):
        ct._tune_malloc()
        model = ct._whisper_model_class(ct.CPU_CALL_CHUNKS)(
            str(bundled_model_path()), device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers)
        return ct.FasterWhisperEngine(model, "tiny.en", workers)

    pool = EnginePool(load)
    with ThreadPoolExecutor(1) as p:  # created off the main thread, as the EnginePool does
        p.submit(pool.get, opts).result()
    work = Path(tempfile.mkdtemp())
    runner = LocalRunner(Settings.from_env(data_dir=str(work / "data")), engines=pool)
    anyio.run(lambda: runner.run(corpus.DATA / "jfk.flac", opts, work / "out"))
    model = pool.get(opts).model
    out = {}
    for name in INPUTS:
        path = next(p for p in corpus.DEFAULT_OUT.glob(name + ".*") if p.suffix in (".flac", ".opus", ".mp3", ".m4a"))
        model.encoded = ct.EncoderCache()
        t0 = time.perf_counter()
        res = anyio.run(lambda: runner.run(path, opts, work / "out"))
        out[name] = {"seconds": round(time.perf_counter() - t0, 2), "text": res.transcript.text,
                     "rungs": dict(res.transcript.stats.coverage.rungs)}
    print(json.dumps(out))


def main() -> None:
    runs = []
    for cfg in ("2x1", "1x2", "2x1", "1x2"):
        done = subprocess.run([sys.executable, __file__, cfg], capture_output=True, text=True, check=True)
        runs.append((cfg, json.loads(done.stdout.strip().splitlines()[-1])))
    for name in INPUTS:
        cells = "  ".join(f"{cfg} {r[name]['seconds']:6.2f}" for cfg, r in runs)
        same = len({r[name]["text"] for _cfg, r in runs}) == 1
        print(f"{name:40} {cells}  rungs {runs[0][1][name]['rungs'] or '-'}  same text: {same}")
    for cfg in ("2x1", "1x2"):
        totals = [sum(v["seconds"] for v in r.values()) for c, r in runs if c == cfg]
        print(f"{cfg}: " + ", ".join(f"{t:.2f} s" for t in totals))


if __name__ == "__main__":
    child(sys.argv[1]) if len(sys.argv) > 1 else main()
