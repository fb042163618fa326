"""The VAD onset pass on one thread or two (workers/vad.py ONSET_THREADS): the whole scan of four
corpus inputs (about 1,500 s of audio), three times each way, in turn; the regions are the same
either way (checked on three of them when it was written).

    python docs/logs/experiments/onset_threads.py     # log: onset_threads.log (AMD EPYC, 2 cores, 26b23de)
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from faster_whisper.audio import decode_audio
from workers import vad
root = Path.home()/'.cache/vtp/corpus'
names = ['lecture-rp-150wpm-gap0.8-8min.flac','rumble-10dB-below-lecture-2v.flac','human-all-gaps0.3-3.flac','paragraphs-4v-185wpm-gap1-3-9min.flac']
audios = [decode_audio(str(root/n)) for n in names]
tot = {1: 0.0, 2: 0.0}; onset = {1: 0.0, 2: 0.0}
orig = vad._original_onsets
def timed(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); onset[vad.ONSET_THREADS] += time.perf_counter() - t; return r
vad._original_onsets = timed
for rep in range(3):
    for th in (1, 2):
        vad.ONSET_THREADS = th
        for a in audios:
            t = time.perf_counter(); vad.scan(*vad.array_reader(a), vad.ChunkingOptions()); tot[th] += time.perf_counter() - t
print('scan total', {k: round(v/3, 2) for k, v in tot.items()}, 'onset pass', {k: round(v/3, 2) for k, v in onset.items()})
