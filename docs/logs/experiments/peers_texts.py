"""Ad hoc (2026-12-02): sequential and batched faster-whisper (bench.peers) over the whole corpus, texts and times to a JSON file
for ladder_order.py.  python docs/logs/experiments/peers_texts.py peers.json  (log: peers_texts.log)"""
import sys, json, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import corpus
from bench.peers import Peers
p = Peers()
entries = corpus.build(corpus.DEFAULT_OUT, corpus.SPECS, log=lambda _l: None)
p.run("sequential", corpus.DATA / "jfk.flac")
out = {}
for e in entries:
    path = corpus.DEFAULT_OUT / e["file"]
    out[e["name"]] = {n: p.run(n, path) for n in ("sequential", "batched")}
    print(e["name"], {n: r["seconds"] for n, r in out[e["name"]].items()}, flush=True)
    Path(sys.argv[1]).write_text(json.dumps(out))
p.close()
