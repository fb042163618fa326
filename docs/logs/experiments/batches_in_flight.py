"""Ad hoc (2026-12-02, AMD EPYC 2 cores): vtp with one batch at a time against two in flight
(``workers.local_runner.CPU_IN_FLIGHT``), on inputs of several batches, where the coverage
ladder fires and where it does not; each setting in a process of its own, in turn, twice.

    git apply docs/logs/experiments/batches_in_flight.patch   # the setting, not kept in the code
    python docs/logs/experiments/batches_in_flight.py          # log: batches_in_flight.log
    git apply -R docs/logs/experiments/batches_in_flight.patch

Run at 85ad939 with the patch applied (the same transcripts, no faster: not kept).

Per input: wall seconds end to end from the media file (an empty encoder cache each run), the
rungs fired, and whether every run wrote the same text."""
import json, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ("lecture-3v-130wpm-gap1.0", "paragraphs-4v-185wpm-gap1-3-9min", "lecture-2v-160wpm-para20-40s",
          "white10dB-music15dB-lecture-mp3-24k", "hum60-10dB-lecture-3v", "lecture-rp-150wpm-gap0.8-8min")


def child(flight: int) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import corpus
    from bench.corpus_eval import Systems
    from workers import local_runner

    local_runner.CPU_IN_FLIGHT = flight
    work = Path(tempfile.mkdtemp())
    systems = Systems(("vtp",), work)  # vtp as ``vtp transcribe`` loads it; an empty cache each run
    systems.run("vtp", corpus.DATA / "jfk.flac")
    out = {}
    for name in INPUTS:
        path = next(p for p in corpus.DEFAULT_OUT.glob(name + ".*") if p.suffix in (".flac", ".opus", ".mp3", ".m4a"))
        r = systems.run("vtp", path)
        out[name] = {"seconds": r["seconds"], "text": r["text"], "rungs": r["coverage"]["rungs"]}
    print(json.dumps(out))


def main() -> None:
    runs = []
    for flight in (1, 2, 1, 2):
        done = subprocess.run([sys.executable, __file__, str(flight)], capture_output=True, text=True, check=True)
        runs.append((flight, json.loads(done.stdout.strip().splitlines()[-1])))
    for name in INPUTS:
        cells = "  ".join(f"{f} in flight {r[name]['seconds']:6.2f}" for f, r in runs)
        same = len({r[name]["text"] for _f, r in runs}) == 1
        print(f"{name:38} {cells}  rungs {runs[0][1][name]['rungs'] or '-'}  same text: {same}")
    for flight in (1, 2):
        totals = [sum(v["seconds"] for v in r.values()) for f, r in runs if f == flight]
        print(f"{flight} in flight: " + ", ".join(f"{t:.2f} s" for t in totals))


if __name__ == "__main__":
    child(int(sys.argv[1])) if len(sys.argv) > 1 else main()
