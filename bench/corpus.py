"""The generated evaluation corpus: speech vtp has never been tuned on, with its references.

    python -m bench.corpus [--out DIR] [--only NAME[,NAME]] [--quick] [--list] [--seed N]
    python -m bench.corpus --slice tests/data      # the small committed slice the tests use

Builds, deterministically (every random choice comes from a seeded generator per input; the same
espeak-ng, sox and ffmpeg give the same bytes), about fifty inputs of 2-10 minutes into
``~/.cache/vtp/corpus`` (or ``--out``): ``NAME.<ext>`` (the input), ``NAME.ref.txt`` (its
reference, one paragraph or phrase a line) and ``NAME.spans.json`` (each line's ``[start, end,
text]`` in seconds of the input), and ``manifest.json`` listing every input with its conditions.
An input already built with the same conditions is kept (delete the folder to rebuild).
``--seed N`` (N > 0) builds a held-out twin of every input into ``~/.cache/vtp/corpus-seedN``:
the same conditions, every random draw different (which paragraphs and sentences, in what order,
which voice speaks which, every pause, gain and bed), so a change tuned on seed 0 is checked on
speech it was not tuned on.

What goes in:
- **Synthetic lectures and talks**: the paragraphs of ``bench/corpus_texts.txt`` (written for this
  project) spoken by espeak-ng voices (US, British, RP, Scottish, Caribbean, New York, Lancaster;
  male and female variants) at 130-190 words a minute (espeak's ``-s``; it speaks about 1.2x
  faster than that, pauses included). Either one espeak call per paragraph (its own short pauses
  between sentences) with a gap between paragraphs, or each sentence alone with pauses of
  0.3-3 s between sentences and paragraphs (and 2-3 s before short phrases). Lectures use
  paragraphs cut to 26-30 s with about 1.2 s between them, the voice changing every paragraph:
  the case issue 19 found losing whole paragraphs.
- **The repository's human speech** (tests/data: 43 IVR prompts, the two talk paragraphs, JFK)
  cut at its pauses and put together in new orders with new gaps, sometimes a quieter "other
  room" for a piece.
- **Beds** mixed at a signal-to-noise ratio measured on the active speech: white and pink noise,
  mains hum (50/60 Hz and harmonics), rumble (low-passed brown noise) and music (chords
  synthesized by sox, with a melody).
- **Encodes**: lossless FLAC, or low-bitrate Opus, AAC and MP3 (the bundled ffmpeg).
- **No speech at all**: silence, music, noise and hum; the reference is empty.

Needs espeak-ng and sox on the PATH (``apt-get install espeak-ng sox``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from workers.audio import ffmpeg_exe

RATE = 16000
DEFAULT_OUT = Path.home() / ".cache" / "vtp" / "corpus"
TEXTS = Path(__file__).with_name("corpus_texts.txt")
DATA = ROOT / "tests" / "data"
#: espeak-ng's real pace against its ``-s`` words a minute (measured: 71 words at ``-s 160`` take
#: 20.4-21.5 s across voices), to aim paragraphs at a length before they are spoken.
ESPEAK_PACE = 0.81
#: Level every piece of speech is brought to (RMS over its active frames), before beds and gains.
SPEECH_DBFS = -20.0
SHORT_WORDS = 8

VOICES = (
    "en-us", "en-gb-x-rp+f3", "en-gb-scotland", "en-us+f2", "en+m3", "en-029+f4", "en-us-nyc",
    "en-gb-x-gbclan+f1", "en-us+m7", "en+f5", "en-gb-x-rp", "en-gb-scotland+f3",
)


@dataclass(frozen=True)
class Spec:
    """One input: what is spoken, by whom, how fast, with what pauses, under what, encoded how."""

    name: str
    kind: str = "tts"  # tts | human | empty
    minutes: float = 3.0
    #: tts: voices, one per paragraph in turn (the order shuffled per input).
    voices: tuple[str, ...] = ("en-us",)
    #: tts: espeak-ng ``-s`` (words a minute) drawn per paragraph from this range.
    rates: tuple[int, int] = (160, 160)
    #: tts: "paragraph" (one espeak call per paragraph) or "sentence" (each sentence alone).
    unit: str = "paragraph"
    #: tts: aim paragraphs at this many seconds (sentences regrouped); None: the bank's paragraphs.
    paragraph_seconds: tuple[float, float] | None = None
    sentence_pause: tuple[float, float] = (0.3, 0.8)
    paragraph_gap: tuple[float, float] = (1.2, 1.2)
    #: Pause before a phrase of at most SHORT_WORDS words, where Whisper is tempted to stop.
    short_pause: tuple[float, float] | None = None
    #: human: which recordings, cut at their pauses and shuffled.
    sources: tuple[str, ...] = ("ivr", "talk", "jfk")
    #: Level change per piece in dB (a speaker further away, another room).
    gain_db: tuple[float, float] = (0.0, 0.0)
    #: (bed, SNR in dB against the active speech); for kind "empty", the bed's level in dBFS.
    beds: tuple[tuple[str, float], ...] = ()
    #: empty: music and noise come and go (silent stretches between).
    gated: bool = False
    codec: str = "flac"  # flac | opus | aac | mp3
    bitrate: str = ""
    quick: bool = False
    #: Upper bound on the input's length (the committed slice stays short).
    max_seconds: float | None = None
    #: Keep only these seconds of the rendered input (and the spans wholly inside): a short
    #: excerpt of a longer input around a place where speech was lost.
    crop: tuple[float, float] | None = None
    #: Draw every random choice as the input of this name does (with ``crop``: its excerpt).
    like: str = ""
    seed: int = 0

    @property
    def ext(self) -> str:
        return {"flac": "flac", "opus": "opus", "aac": "m4a", "mp3": "mp3"}[self.codec]

    def conditions(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("name", "quick", "seed", "max_seconds", "crop", "like")}
        if self.kind != "tts":
            for k in ("voices", "rates", "unit", "paragraph_seconds", "sentence_pause"):
                d.pop(k)
        if self.kind != "human":
            d.pop("sources")
        if self.kind == "empty":
            for k in ("paragraph_gap", "short_pause", "gain_db"):
                d.pop(k)
        return d


def _lecture(name: str, voices, rate, gap, minutes, **kw) -> Spec:
    return Spec(name, voices=tuple(voices), rates=(rate, rate) if isinstance(rate, int) else rate,
                paragraph_seconds=kw.pop("paragraph_seconds", (26.0, 30.0)), paragraph_gap=gap, minutes=minutes, **kw)


V = VOICES
SPECS: tuple[Spec, ...] = (
    # -- the quick subset: 2-3 minutes each, one of each condition --------------------------------
    _lecture("q-lecture-2v-160wpm-gap1.2", (V[0], V[1]), 160, (1.2, 1.2), 2.5, quick=True),
    Spec("q-sentences-pauses0.3-3s-opus16k", voices=(V[3], V[2]), rates=(140, 180), unit="sentence",
         sentence_pause=(0.3, 1.5), paragraph_gap=(1.5, 3.0), short_pause=(2.0, 3.0), minutes=2.5,
         codec="opus", bitrate="16k", quick=True),
    Spec("q-human-reordered-short-after-pause", kind="human", paragraph_gap=(0.3, 1.5), short_pause=(2.0, 3.0),
         gain_db=(-9.0, 0.0), minutes=2.7, quick=True),
    Spec("q-rumble-10dB-below", voices=(V[4], V[5]), rates=(150, 150), paragraph_gap=(0.8, 2.0),
         beds=(("rumble", -10.0),), minutes=2.5, quick=True),
    Spec("q-music-10dB-aac24k", voices=(V[5], V[6]), rates=(170, 170), paragraph_gap=(0.5, 2.5),
         beds=(("music", 10.0),), codec="aac", bitrate="24k", minutes=2.5, quick=True),
    Spec("q-noise10dB-hum60-mp3-24k", voices=(V[10], V[8]), rates=(130, 150), unit="sentence",
         sentence_pause=(0.3, 1.0), paragraph_gap=(1.0, 2.0), beds=(("white", 10.0), ("hum60", 5.0)),
         codec="mp3", bitrate="24k", minutes=2.5, quick=True),
    Spec("q-human-ivr-shuffled-opus24k", kind="human", sources=("ivr",), paragraph_gap=(0.3, 3.0),
         codec="opus", bitrate="24k", minutes=2.5, quick=True),
    Spec("q-empty-music-and-silence", kind="empty", beds=(("music", -24.0),), gated=True, minutes=2.0, quick=True),
    # -- lectures: paragraphs of 26-30 s, a voice per paragraph -----------------------------------
    _lecture("lecture-4v-160wpm-gap1.2-6min", V[:4], 160, (1.2, 1.2), 6.0),
    _lecture("lecture-3v-130wpm-gap1.0", V[4:7], 130, (1.0, 1.0), 5.0),
    _lecture("lecture-3v-190wpm-gap1.5", V[7:10], 190, (1.5, 1.5), 5.0),
    _lecture("lecture-rp-150wpm-gap0.8-8min", (V[10],), 150, (0.8, 0.8), 8.0),
    _lecture("lecture-5v-170wpm-gap1.2-2-10min", V[::2][:5], 170, (1.2, 2.0), 10.0),
    _lecture("lecture-2f-140wpm-gap2.5-3", (V[1], V[3]), 140, (2.5, 3.0), 4.0),
    _lecture("lecture-4v-180wpm-gap1.2-aac32k", V[3:7], 180, (1.2, 1.2), 6.0, codec="aac", bitrate="32k"),
    _lecture("lecture-3v-160wpm-gap1.2-opus16k", V[8:11], 160, (1.2, 1.2), 5.0, codec="opus", bitrate="16k"),
    _lecture("lecture-2v-160wpm-para20-40s", (V[2], V[9]), 160, (1.2, 1.2), 7.0, paragraph_seconds=(20.0, 40.0)),
    _lecture("lecture-4v-150wpm-pink20dB", V[1:5], 150, (1.2, 1.2), 6.0, beds=(("pink", 20.0),)),
    # -- the bank's paragraphs as they are (3-35 s), one espeak call each -------------------------
    Spec("paragraphs-2v-150wpm-gap0.5-3", voices=(V[0], V[7]), rates=(150, 150), paragraph_gap=(0.5, 3.0), minutes=4.0),
    Spec("paragraphs-3v-175wpm-gap0.3-1", voices=V[9:12], rates=(175, 175), paragraph_gap=(0.3, 1.0), minutes=3.0),
    Spec("paragraphs-scotland-135wpm-gap1-2", voices=(V[2],), rates=(135, 135), paragraph_gap=(1.0, 2.0), minutes=5.0),
    Spec("paragraphs-4v-185wpm-gap1-3-9min", voices=V[4:8], rates=(185, 185), paragraph_gap=(1.0, 3.0), minutes=9.0),
    # -- each sentence alone, with pauses between ---------------------------------------------------
    Spec("sentences-2v-160wpm-pause0.3-1", voices=(V[6], V[11]), rates=(160, 160), unit="sentence",
         sentence_pause=(0.3, 1.0), paragraph_gap=(1.0, 2.0), minutes=4.0),
    Spec("sentences-1v-140wpm-pause1-3", voices=(V[1],), rates=(140, 140), unit="sentence",
         sentence_pause=(1.0, 3.0), paragraph_gap=(2.0, 3.0), minutes=3.0),
    Spec("sentences-3v-130-190wpm-pause0.3-3", voices=V[0:3], rates=(130, 190), unit="sentence",
         sentence_pause=(0.3, 3.0), paragraph_gap=(0.5, 3.0), minutes=6.0),
    Spec("sentences-2v-170wpm-short-after-2-3s", voices=(V[5], V[10]), rates=(170, 170), unit="sentence",
         sentence_pause=(0.3, 0.8), paragraph_gap=(1.0, 1.5), short_pause=(2.0, 3.0), minutes=3.0),
    Spec("sentences-4v-155wpm-pause0.5-2-mp3-32k", voices=V[7:11], rates=(155, 155), unit="sentence",
         sentence_pause=(0.5, 2.0), paragraph_gap=(1.0, 2.5), codec="mp3", bitrate="32k", minutes=5.0),
    # -- the repository's human speech in new orders -----------------------------------------------
    Spec("human-all-gaps0.3-3", kind="human", paragraph_gap=(0.3, 3.0), minutes=4.5),
    Spec("human-ivr-tight-gaps0.3-0.6", kind="human", sources=("ivr",), paragraph_gap=(0.3, 0.6), minutes=3.0),
    Spec("human-all-gaps2-3-other-room", kind="human", paragraph_gap=(2.0, 3.0), gain_db=(-12.0, 0.0), minutes=5.0),
    Spec("human-all-gaps0.5-1.5-aac24k", kind="human", paragraph_gap=(0.5, 1.5), codec="aac", bitrate="24k", minutes=3.5),
    Spec("human-all-short-after-pause-opus12k", kind="human", paragraph_gap=(0.4, 1.2), short_pause=(2.0, 3.0),
         codec="opus", bitrate="12k", minutes=4.0),
    # -- beds -------------------------------------------------------------------------------------
    _lecture("rumble-10dB-below-lecture-2v", (V[0], V[5]), 160, (1.2, 1.2), 4.0, beds=(("rumble", -10.0),)),
    Spec("rumble-20dB-below-human", kind="human", paragraph_gap=(0.5, 2.0), beds=(("rumble", -20.0),), minutes=4.0),
    Spec("rumble0dB-hum50-5dB-sentences", voices=(V[3], V[4]), rates=(150, 170), unit="sentence",
         sentence_pause=(0.3, 1.5), paragraph_gap=(1.0, 2.5), beds=(("rumble", 0.0), ("hum50", 5.0)), minutes=3.0),
    Spec("hum50-0dB-paragraphs", voices=(V[6], V[7]), rates=(160, 160), paragraph_gap=(0.8, 2.0),
         beds=(("hum50", 0.0),), minutes=3.0),
    _lecture("hum60-10dB-lecture-3v", V[9:12], 165, (1.2, 1.2), 5.0, beds=(("hum60", 10.0),)),
    Spec("white20dB-paragraphs", voices=(V[8], V[0]), rates=(145, 145), paragraph_gap=(0.5, 2.0),
         beds=(("white", 20.0),), minutes=3.0),
    Spec("white5dB-sentences", voices=(V[1], V[2]), rates=(150, 150), unit="sentence", sentence_pause=(0.3, 1.5),
         paragraph_gap=(1.0, 2.0), beds=(("white", 5.0),), minutes=3.0),
    Spec("pink10dB-human", kind="human", paragraph_gap=(0.3, 2.0), beds=(("pink", 10.0),), minutes=4.0),
    _lecture("music15dB-lecture-3v", V[2:5], 160, (1.2, 1.2), 5.0, beds=(("music", 15.0),)),
    Spec("music5dB-paragraphs", voices=(V[10], V[3]), rates=(160, 160), paragraph_gap=(0.5, 2.0),
         beds=(("music", 5.0),), minutes=3.0),
    Spec("music10dB-human-opus16k", kind="human", paragraph_gap=(0.5, 2.5), beds=(("music", 10.0),),
         codec="opus", bitrate="16k", minutes=4.0),
    _lecture("white10dB-music15dB-lecture-mp3-24k", (V[6], V[1]), 170, (1.2, 1.2), 4.0,
             beds=(("white", 10.0), ("music", 15.0)), codec="mp3", bitrate="24k"),
    # -- low-bitrate encodes of clean speech -------------------------------------------------------
    Spec("opus12k-paragraphs", voices=(V[11], V[4]), rates=(165, 165), paragraph_gap=(0.5, 2.0),
         codec="opus", bitrate="12k", minutes=3.0),
    Spec("aac24k-sentences", voices=(V[7], V[0]), rates=(155, 155), unit="sentence", sentence_pause=(0.3, 1.5),
         paragraph_gap=(1.0, 2.0), codec="aac", bitrate="24k", minutes=3.0),
    _lecture("mp3-24k-lecture-2v", (V[8], V[2]), 160, (1.2, 1.2), 4.0, codec="mp3", bitrate="24k"),
    # -- no speech: the transcript should stay (nearly) empty --------------------------------------
    Spec("empty-silence", kind="empty", beds=(("white", -70.0),), minutes=3.0),
    Spec("empty-music-gated", kind="empty", beds=(("music", -22.0),), gated=True, minutes=3.0),
    Spec("empty-noise-and-hum", kind="empty", beds=(("white", -40.0), ("hum50", -30.0)), minutes=2.0),
    Spec("empty-music-rumble-opus16k", kind="empty", beds=(("music", -26.0), ("rumble", -20.0)),
         codec="opus", bitrate="16k", minutes=2.0),
)


def excerpt(name: str, of: str, start: float, end: float, **changes) -> Spec:
    """Seconds ``start``-``end`` of input ``of``, rendered exactly as there (same draws)."""
    base = next(s for s in SPECS if s.name == of)
    return replace(base, name=name, quick=False, crop=(start, end), like=of, **changes)


#: The committed test slice (tests/data/corpus_*): short, small, each a failure mode of issue 19.
SLICE: tuple[Spec, ...] = (
    # 64 s, Opus 16 kbps: the first two paragraphs of a three-voice lecture; on 2026-12-01 vtp lost
    # the whole first paragraph (62 words) here, sequential Whisper none.
    excerpt("corpus_lecture", "lecture-3v-160wpm-gap1.2-opus16k", 0.0, 64.0),
    # 76 s: human speech reordered, 2-3 s before short prompts, a talk paragraph (12 words lost).
    excerpt("corpus_reordered", "q-human-reordered-short-after-pause", 13.0, 88.5, codec="opus", bitrate="24k"),
    Spec("corpus_rumble", voices=(V[4], V[5]), rates=(155, 155), paragraph_gap=(0.8, 1.5),
         beds=(("rumble", -10.0),), minutes=0.9, codec="opus", bitrate="24k", max_seconds=75.0),
)


# -- text ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bank() -> tuple[tuple[str, ...], ...]:
    """The text bank's paragraphs, each as its sentences."""
    lines = [ln for ln in TEXTS.read_text().splitlines() if not ln.startswith("#")]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    return tuple(tuple(s.strip() for s in re.split(r"(?<=[.?!])\s+", " ".join(p.split())) if s.strip()) for p in paragraphs)


def words(text: str) -> int:
    return len(text.split())


# -- audio helpers -----------------------------------------------------------------------------------


def active_rms(x: np.ndarray) -> float:
    """RMS over the frames within 35 dB of the loudest (speech, not the pauses between)."""
    frame = RATE // 50
    n = x.size // frame
    if n == 0:
        return 0.0
    power = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    if power.max() <= 0:
        return 0.0
    keep = power > power.max() * 10 ** (-35 / 10)
    return float(np.sqrt(power[keep].mean()))


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = active_rms(x)
    return x if rms == 0 else (x * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def trim(x: np.ndarray, margin_s: float = 0.02) -> np.ndarray:
    """Drop the leading and trailing silence a synthesizer adds (the gaps are ours to set)."""
    loud = np.flatnonzero(np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9))
    if loud.size == 0:
        return x[:0]
    m = int(margin_s * RATE)
    return x[max(0, loud[0] - m) : loud[-1] + m]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), dtype=np.float32)


def read_pcm(path: Path) -> np.ndarray:
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"]
    data = subprocess.run(cmd, check=True, capture_output=True, timeout=300).stdout
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def speak(text: str, voice: str, wpm: int) -> np.ndarray:
    """espeak-ng at 22.05 kHz -> 16 kHz float32, trimmed."""
    from scipy.signal import resample_poly

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", f.name], input=text.encode(), check=True, timeout=120)
        raw = Path(f.name).read_bytes()
    pcm = np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0
    return trim(resample_poly(pcm, 320, 441).astype(np.float32))


# -- beds --------------------------------------------------------------------------------------------


def bed(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A bed of ``n`` samples at unit RMS."""
    from scipy.signal import butter, sosfilt

    t = np.arange(n) / RATE
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / RATE)
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0
        x = np.fft.irfft(spec, n)
    elif kind in ("hum50", "hum60"):
        f0 = 50.0 if kind == "hum50" else 60.0
        x = np.zeros(n)
        for k, a in enumerate((1.0, 0.6, 0.45, 0.3, 0.2, 0.15), start=1):
            x += a * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
        x *= 1 + 0.1 * np.sin(2 * np.pi * 0.3 * t)
    elif kind == "rumble":
        x = np.cumsum(rng.standard_normal(n))
        x = sosfilt(butter(4, [5, 150], btype="bandpass", fs=RATE, output="sos"), x)
    elif kind == "music":
        x = music(n, rng)
    else:
        raise ValueError(f"unknown bed {kind!r}")
    x = np.asarray(x, dtype=np.float64)
    rms = np.sqrt((x**2).mean()) if n else 0.0
    return (x / rms if rms > 0 else x).astype(np.float32)


NOTES = {"C": 261.63, "D": 293.66, "E": 329.63, "F": 349.23, "G": 392.0, "A": 440.0, "B": 493.88}
CHORDS = {
    "C": ("C", "E", "G"), "Am": ("A", "C", "E"), "F": ("F", "A", "C"), "G": ("G", "B", "D"),
    "Dm": ("D", "F", "A"), "Em": ("E", "G", "B"),
}


@lru_cache(maxsize=64)
def sox_chord(chord: str, seconds: float) -> np.ndarray:
    """A plucked chord with a soft sine pad under it, synthesized by sox (one channel per note)."""
    freqs = [NOTES[n] / 2 for n in CHORDS[chord]]
    out = []
    for voice in ("pluck", "sine"):
        cmd = ["sox", "-n", "-r", str(RATE), "-c", "3", "-b", "16", "-t", "raw", "-e", "signed-integer", "-",
               "synth", f"{seconds:.3f}"]
        for f in freqs:
            cmd += [voice, f"{f:.2f}"]
        if voice == "sine":
            cmd += ["fade", "q", "0.2", f"{seconds:.3f}", "0.4", "vol", "0.25"]
        raw = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
        out.append(np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(-1, 3).sum(axis=1) / 32768.0)
    m = min(a.size for a in out)
    return out[0][:m] + out[1][:m]



def music(n: int, rng: np.random.Generator) -> np.ndarray:
    """Chord progressions (sox) with a plain melody on top: music-like, without words."""
    bar = float(rng.choice([1.6, 2.0, 2.4]))
    progressions = (("C", "Am", "F", "G"), ("Am", "F", "C", "G"), ("C", "F", "Dm", "G"), ("Em", "C", "G", "Dm"))
    prog = progressions[int(rng.integers(len(progressions)))]
    pieces, total, i = [], 0, 0
    while total < n:
        chord = sox_chord(prog[i % len(prog)], bar)
        mel = np.zeros_like(chord)
        step = int(bar * RATE / 4)
        tt = np.arange(step) / RATE
        for j in range(4):
            f = NOTES[CHORDS[prog[i % len(prog)]][int(rng.integers(3))]] * float(rng.choice([1.0, 2.0]))
            seg = np.sin(2 * np.pi * f * tt) * np.exp(-tt * 4) * 0.3
            mel[j * step : j * step + seg.size] += seg[: max(0, mel.size - j * step)]
        pieces.append(chord + mel)
        total += chord.size
        i += 1
    return np.concatenate(pieces)[:n]


def gate(n: int, rng: np.random.Generator) -> np.ndarray:
    """On/off envelope: stretches of 5-30 s, with 50 ms ramps."""
    env, pos, on = np.zeros(n, dtype=np.float32), 0, bool(rng.integers(2))
    ramp = int(0.05 * RATE)
    while pos < n:
        length = int(rng.uniform(5, 30) * RATE)
        if on:
            seg = np.ones(min(length, n - pos), dtype=np.float32)
            r = min(ramp, seg.size // 2)
            if r:
                seg[:r] = np.linspace(0, 1, r)
                seg[-r:] = np.linspace(1, 0, r)
            env[pos : pos + seg.size] = seg
        pos += length
        on = not on
    return env


# -- speech --------------------------------------------------------------------------------------------


@dataclass
class Track:
    pieces: list[np.ndarray] = field(default_factory=list)
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    length: int = 0

    @property
    def seconds(self) -> float:
        return self.length / RATE

    def pause(self, seconds: float) -> None:
        self.add(silence(seconds))

    def add(self, audio: np.ndarray, text: str | None = None) -> None:
        if text is not None:
            self.spans.append((round(self.seconds, 3), round((self.length + audio.size) / RATE, 3), text))
        self.pieces.append(audio.astype(np.float32))
        self.length += audio.size

    def audio(self) -> np.ndarray:
        return np.concatenate(self.pieces) if self.pieces else silence(0)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(lo if lo == hi else rng.uniform(lo, hi))


def _fits(spec: Spec, track: Track, more_s: float) -> bool:
    return spec.max_seconds is None or track.seconds + more_s <= spec.max_seconds


def tts_track(spec: Spec, rng: np.random.Generator) -> Track:
    paragraphs = list(bank())
    order = rng.permutation(len(paragraphs))
    stream = [list(paragraphs[i]) for i in order]  # no paragraph twice in one input
    voices = list(spec.voices)
    rng.shuffle(voices)
    track, target, p = Track(), spec.minutes * 60, 0

    def next_paragraph(wpm: int) -> list[str]:
        nonlocal stream
        if spec.paragraph_seconds is None:
            return stream.pop(0)
        aim = _uniform(rng, spec.paragraph_seconds)
        out: list[str] = []

        def est(sentences: list[str]) -> float:
            return sum(map(words, sentences)) * 60 / wpm * ESPEAK_PACE

        while stream:  # sentences in turn, stopping at the cut nearest the aim
            if not stream[0]:
                stream.pop(0)
                continue
            longer = est(out + stream[0][:1])
            if out and longer > aim and longer - aim > aim - est(out):
                break
            out.append(stream[0].pop(0))
            if longer >= aim:
                break
        stream = [s for s in stream if s]
        return out

    while track.seconds < target and stream:
        voice = voices[p % len(voices)]
        wpm = int(rng.integers(spec.rates[0], spec.rates[1] + 1))
        sentences = next_paragraph(wpm)
        if not sentences:
            break
        if spec.unit == "paragraph":
            text = " ".join(sentences)
            audio = at_level(speak(text, voice, wpm), SPEECH_DBFS + _uniform(rng, spec.gain_db))
            gap = _before(spec, rng, text, spec.paragraph_gap) if p else 0.0
            if p and not _fits(spec, track, gap + audio.size / RATE):
                break
            track.pause(gap)
            track.add(audio, text)
        else:
            gain = SPEECH_DBFS + _uniform(rng, spec.gain_db)
            for k, sentence in enumerate(sentences):
                audio = at_level(speak(sentence, voice, wpm), gain)
                gap = _before(spec, rng, sentence, spec.sentence_pause if k else spec.paragraph_gap) if (p or k) else 0.0
                if not _fits(spec, track, gap + audio.size / RATE):
                    return track
                track.pause(gap)
                track.add(audio, sentence)
        p += 1
    return track


def _before(spec: Spec, rng: np.random.Generator, text: str, normal: tuple[float, float]) -> float:
    if spec.short_pause and words(text) <= SHORT_WORDS:
        return _uniform(rng, spec.short_pause)
    return _uniform(rng, normal)


@lru_cache(maxsize=1)
def human_pieces() -> dict[str, list[tuple[np.ndarray, str]]]:
    """The repository's human speech cut at its pauses, each piece with its reference line."""
    out = {}
    for key, name in (("ivr", "ivr_prompts.mp4"), ("talk", "talk_tts.mp4"), ("jfk", "jfk.flac")):
        audio = read_pcm(DATA / name)
        lines = [ln.strip() for ln in (DATA / (name.rsplit(".", 1)[0] + ".ref.txt")).read_text().splitlines() if ln.strip()]
        spans = speech_spans(audio, min_pause_s=0.4 if key == "ivr" else 1.0)
        if len(lines) == 1 and spans:
            spans = [(spans[0][0], spans[-1][1])]
        if len(spans) != len(lines):
            raise RuntimeError(f"{name}: {len(spans)} spoken pieces for {len(lines)} reference lines")
        pad = int(0.12 * RATE)
        out[key] = [(audio[max(0, s - pad) : e + pad], line) for (s, e), line in zip(spans, lines)]
    return out


def speech_spans(audio: np.ndarray, min_pause_s: float) -> list[tuple[int, int]]:
    """Sample ranges of speech separated by at least ``min_pause_s`` of frames 30 dB under the loudest."""
    frame = RATE // 50
    n = audio.size // frame
    db = 10 * np.log10(np.maximum((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1), 1e-12))
    loud = db > db.max() - 30
    spans: list[list[int]] = []
    for i in np.flatnonzero(loud):
        if spans and (i - spans[-1][1]) * frame < min_pause_s * RATE:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [(s * frame, e * frame) for s, e in spans if (e - s) * frame >= 0.15 * RATE]


def human_track(spec: Spec, rng: np.random.Generator) -> Track:
    pieces = [p for key in spec.sources for p in human_pieces()[key]]
    track, target = Track(), spec.minutes * 60
    for i in rng.permutation(len(pieces)):
        if track.seconds >= target:
            break
        audio, text = pieces[i]
        audio = at_level(audio, SPEECH_DBFS + _uniform(rng, spec.gain_db))
        gap = _before(spec, rng, text, spec.paragraph_gap) if track.pieces else 0.0
        if not _fits(spec, track, gap + audio.size / RATE):
            continue
        track.pause(gap)
        track.add(audio, text)
    return track


# -- one input -----------------------------------------------------------------------------------------


def render(spec: Spec) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The input's samples (16 kHz float32) and its spoken spans."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{spec.like or spec.name}/{spec.seed}".encode()).digest()[:8], "little"))
    if spec.kind == "empty":
        n = int(spec.minutes * 60 * RATE)
        mix = np.zeros(n, dtype=np.float32)
        for kind, dbfs in spec.beds:
            mix += bed(kind, n, rng) * 10 ** (dbfs / 20)
        if spec.gated:
            mix *= gate(n, rng)
        return mix, []
    track = tts_track(spec, rng) if spec.kind == "tts" else human_track(spec, rng)
    speech = track.audio()
    lead, tail = silence(_uniform(rng, (0.3, 1.5))), silence(_uniform(rng, (0.5, 2.0)))
    speech = np.concatenate([lead, speech, tail])
    shift = lead.size / RATE
    spans = [(round(s + shift, 3), round(e + shift, 3), t) for s, e, t in track.spans]
    power = active_rms(speech) ** 2
    mix = speech.copy()
    for kind, snr in spec.beds:
        mix += bed(kind, mix.size, rng) * np.sqrt(power / 10 ** (snr / 10))
    peak = np.abs(mix).max()
    if peak > 0.95:
        mix *= 0.95 / peak
    if spec.crop:
        a, b = spec.crop
        mix = mix[int(a * RATE) : int(b * RATE)]
        spans = [(round(s - a, 3), round(e - a, 3), t) for s, e, t in spans if s >= a and e <= b]
    return mix, spans


def encode(samples: np.ndarray, dest: Path, spec: Spec) -> None:
    codec = {
        "flac": ["-c:a", "flac"],
        "opus": ["-c:a", "libopus", "-b:a", spec.bitrate or "24k"],
        "aac": ["-c:a", "aac", "-b:a", spec.bitrate or "32k"],
        "mp3": ["-c:a", "libmp3lame", "-b:a", spec.bitrate or "32k"],
    }[spec.codec]
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "s16le", "-ar", str(RATE), "-ac", "1", "-i", "-",
           "-map_metadata", "-1", "-fflags", "+bitexact", *codec, str(dest)]
    subprocess.run(cmd, input=pcm, check=True, timeout=600)


def build_one(spec: Spec, out: Path) -> dict:
    """Write one input, its reference and spans; return its manifest entry (kept if up to date)."""
    key = hashlib.sha256(json.dumps([asdict(spec), TEXTS.read_text(), 2], sort_keys=True).encode()).hexdigest()[:16]
    media = out / f"{spec.name}.{spec.ext}"
    meta = out / f"{spec.name}.spans.json"
    if media.exists() and meta.exists():
        old = json.loads(meta.read_text())
        if old.get("key") == key:
            return old["entry"]
    samples, spans = render(spec)
    encode(samples, media, spec)
    reference = "\n".join(t for _s, _e, t in spans)
    (out / f"{spec.name}.ref.txt").write_text(reference + ("\n" if reference else ""))
    speech_s = sum(e - s for s, e, _t in spans)
    entry = {
        "name": spec.name,
        "file": media.name,
        "reference": f"{spec.name}.ref.txt",
        "spans": meta.name,
        "seconds": round(samples.size / RATE, 2),
        "speech_seconds": round(speech_s, 2),
        "words": sum(words(t) for _s, _e, t in spans),
        "words_per_minute": round(60 * sum(words(t) for _s, _e, t in spans) / speech_s) if speech_s else 0,
        "quick": spec.quick,
        "conditions": spec.conditions(),
    }
    meta.write_text(json.dumps({"key": key, "entry": entry, "spans": spans}, indent=1))
    return json.loads(json.dumps(entry))  # as read back: lists, not tuples


def build(out: Path = DEFAULT_OUT, specs: tuple[Spec, ...] = SPECS, log=print) -> list[dict]:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"corpus: {tool} is not installed (apt-get install espeak-ng sox)")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in specs:
        entry = build_one(spec, out)
        entries.append(entry)
        log(f"{entry['name']:45} {entry['seconds']:6.1f} s  {entry['words']:5d} words  {entry['file']}")
    manifest = out / "manifest.json"
    known = {e["name"]: e for e in json.loads(manifest.read_text())["inputs"]} if manifest.exists() else {}
    known.update({e["name"]: e for e in entries})
    order = [s.name for s in SPECS + SLICE]
    inputs = sorted(known.values(), key=lambda e: order.index(e["name"]) if e["name"] in order else len(order))
    manifest.write_text(json.dumps({"generator": "bench/corpus.py", "inputs": inputs}, indent=1) + "\n")
    return entries


def out_dir(seed: int = 0) -> Path:
    """Where ``seed``'s corpus is built by default: seed 0 is the corpus, others its held-out twins."""
    return DEFAULT_OUT if not seed else DEFAULT_OUT.with_name(f"corpus-seed{seed}")


def select(
    only: str | None = None, quick: bool = False, specs: tuple[Spec, ...] = SPECS, seed: int = 0
) -> tuple[Spec, ...]:
    if seed:
        specs = tuple(replace(s, seed=seed) for s in specs)
    chosen = tuple(s for s in specs if s.quick or not quick)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        chosen = tuple(s for s in specs if any(n == s.name or n in s.name for n in names))
        if not chosen:
            raise SystemExit(f"corpus: no input matches {only!r}")
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="where to build (default ~/.cache/vtp/corpus, or corpus-seedN)")
    ap.add_argument("--seed", type=int, default=0, help="a held-out twin of the corpus: every random draw differs")
    ap.add_argument("--only", help="comma list of input names (or parts of names)")
    ap.add_argument("--quick", action="store_true", help="only the quick subset")
    ap.add_argument("--list", action="store_true", help="list the inputs and their conditions, build nothing")
    ap.add_argument("--slice", type=Path, metavar="DIR", help="build the committed test slice into DIR (tests/data)")
    args = ap.parse_args()
    if args.list:
        for s in SPECS:
            print(f"{s.name:45} {'quick ' if s.quick else ''}{json.dumps(s.conditions())}")
        return
    if args.slice:
        args.slice.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for entry in build(Path(tmp), SLICE):
                for key in ("file", "reference"):
                    shutil.copy(Path(tmp) / entry[key], args.slice / entry[key])
        return
    build(args.out or out_dir(args.seed), select(args.only, args.quick, seed=args.seed))


if __name__ == "__main__":
    main()
