"""Ad hoc (2026-12-02, run at fe5c15f, Intel Xeon 2 cores): vtp at several first-pass beams against the batched pipeline, interleaved per input.

    python docs/logs/experiments/first_pass_beam.py all 5,2,1

Prints time, WER and lost runs per input and the totals (log: first_pass_beam.log); the batched
pipeline via bench.peers, vtp as bench.corpus_eval loads it with ``beam_size`` replaced."""
import sys, json, tempfile, time
from pathlib import Path
import msgspec
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import corpus
from bench.corpus_eval import Systems, score
inputs = sys.argv[1].split(",")
beams = [int(b) for b in sys.argv[2].split(",")]
work = Path(tempfile.mkdtemp())
s = Systems(("batched", "vtp"), work)
base = s.options
def vtp(b, path):
    s.options = msgspec.structs.replace(base, beam_size=b)
    return s.run("vtp", path)
for b in beams: vtp(b, corpus.DATA / "jfk.flac")
s.run("batched", corpus.DATA / "jfk.flac")
entries = {e["name"]: e for e in corpus.build(corpus.DEFAULT_OUT, corpus.SPECS, log=lambda _l: None)}
if inputs == ["all"]: inputs = list(entries)
tot = {}
for name in inputs:
    e = entries[name]
    path = corpus.DEFAULT_OUT / e["file"]; ref = (corpus.DEFAULT_OUT / e["reference"]).read_text()
    res = {"bat": s.run("batched", path)}
    for b in beams: res[f"b{b}"] = vtp(b, path)
    line = f"{name:40} {e['seconds']:5.0f}s"
    for k, r in res.items():
        sc = score(ref, r["text"], None)
        t = tot.setdefault(k, [0, 0, 0, 0]); t[0] += r["seconds"]; t[1] += sc.get("errors", 0); t[2] += sc.get("ref_words", 0); t[3] += len(sc.get("lost_runs", []))
        rungs = r.get("coverage", {}).get("rungs") or ""
        line += f" | {k} {r['seconds']:5.1f}s " + (f"wer {100*sc['wer']:4.1f} lost {len(sc['lost_runs'])}" if "wer" in sc else f"words {sc['words_emitted']}") + (f" {rungs}" if rungs else "")
    print(line, flush=True)
print("TOTAL", {k: f"{v[0]:.1f}s wer {100*v[1]/max(1,v[2]):.1f} lost {v[3]} speed vs bat {tot['bat'][0]/v[0]:.2f}" for k, v in tot.items()}, flush=True)
s.close()
