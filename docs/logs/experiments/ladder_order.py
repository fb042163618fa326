"""Ad hoc (2026-12-02, run at acbc8ca: the encoder cache at 48 MiB, cleared before each run; Intel Xeon 2 cores): vtp with
its ladder as it is (base) and with a whole chunk decoded whole with timestamp tokens before its
halves (ts-first), interleaved per input, scored against the references and against sequential
faster-whisper's texts from peers_texts.py (same machine, run just before).

    python docs/logs/experiments/peers_texts.py peers.json
    python docs/logs/experiments/ladder_order.py base,ts-first all peers.json

Log: ladder_order.log (speed: the peers' times are from their own run, not interleaved)."""
import sys, json, tempfile, time, collections
from pathlib import Path
import anyio, msgspec
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import corpus
from bench.corpus_eval import score
from app.config import Settings
from app.messages import TranscribeOptions
from workers.engines.pool import EnginePool
from workers.local_runner import LocalRunner
from workers import coverage as cov
from workers.engines.base import Decoding, FAST, FALLBACK_TEMPERATURES
from concurrent.futures import ThreadPoolExecutor
TS = Decoding(timestamps=True)
VARIANTS = {
    "base": cov.LADDER,
    "ts-first": (
        cov.Rung("alone", FAST, for_chunks=False),
        cov.Rung("timestamps", TS, for_chunks=False),
        cov.Rung("timestamps", TS, for_gaps=False),
        cov.Rung("shifted", TS, window="shifted"),
        cov.Rung("fallback", Decoding(timestamps=True, temperatures=FALLBACK_TEMPERATURES), strict=True, repeats="timestamps"),
    ),
}
names = sys.argv[1].split(",")
only = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] != "all" else None
peers = json.loads(Path(sys.argv[3] if len(sys.argv) > 3 else "peers.json").read_text())
options = TranscribeOptions(batch_size=8, beam_size=5, formats=("json",))
engines = EnginePool()
with ThreadPoolExecutor(1) as pool:
    pool.submit(engines.get, options).result()
work = Path(tempfile.mkdtemp())
runners = {n: LocalRunner(Settings.from_env(data_dir=str(work / "data")), engines=engines, coverage=cov.CoverageOptions(ladder=VARIANTS[n])) for n in names}
for r in runners.values():
    anyio.run(lambda: r.run(corpus.DATA / "jfk.flac", options, work / "out"))
entries = corpus.build(corpus.DEFAULT_OUT, corpus.SPECS, log=lambda _l: None)
tot = collections.defaultdict(lambda: collections.Counter())
for e in entries:
    if only and e["name"] not in only: continue
    if e["name"] not in peers: continue
    path = corpus.DEFAULT_OUT / e["file"]; ref = (corpus.DEFAULT_OUT / e["reference"]).read_text()
    seq = peers[e["name"]]["sequential"]["text"]
    line = f"{e['name'][:34]:34} {e['seconds']:4.0f}s"
    for k in ("sequential", "batched"):
        sc = score(ref, peers[e["name"]][k]["text"], None if k == "sequential" else seq)
        t = tot[k]; t["n"] += 1; t["s"] += peers[e["name"]][k]["seconds"]; t["err"] += sc.get("errors", 0); t["ref"] += sc.get("ref_words", 0); t["lostseq"] += len(sc.get("lost_vs_sequential", [])); t["words_empty"] += sc.get("words_emitted", 0)
    line += f" | bat {peers[e['name']]['batched']['seconds']:5.1f}s"
    from workers.engines.ctranslate2 import EncoderCache
    eng = engines.get(options)
    for n, runner in (list(runners.items()) if tot["sequential"]["n"] % 2 else list(runners.items())[::-1]):
        eng.model.encoded = EncoderCache()
        t0 = time.perf_counter(); res = anyio.run(lambda: runner.run(path, options, work / "out")); secs = time.perf_counter() - t0
        tr = res.transcript; sc = score(ref, tr.text, seq)
        t = tot[n]; t["s"] += secs; t["err"] += sc.get("errors", 0); t["ref"] += sc.get("ref_words", 0); t["lostseq"] += len(sc.get("lost_vs_sequential", [])); t["words_empty"] += sc.get("words_emitted", 0)
        t["unheard"] += tr.stats.coverage.unheard_seconds
        for rung, c in (tr.stats.coverage.rungs or {}).items(): t["r_" + rung] += c
        line += f" | {n} {secs:5.1f}s " + (f"wer {100*sc['wer']:4.1f} lostseq {len(sc['lost_vs_sequential'])}" if "wer" in sc else f"w {sc['words_emitted']}") + f" {dict(tr.stats.coverage.rungs or {})}"
    print(line, flush=True)
for n, t in tot.items():
    print("TOTAL", n, f"{t['s']:.1f}s vs bat {tot['batched']['s']/t['s']:.2f} wer {100*t['err']/max(1,t['ref']):.1f} lostseq {t['lostseq']} empty-words {t['words_empty']} unheard {t['unheard']:.1f}", {k: v for k, v in t.items() if k.startswith('r_')}, flush=True)
