"""Test media made on the fly from tests/data with the bundled ffmpeg (never committed)."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np

from workers.audio import ffmpeg_exe

#: container -> ffmpeg output arguments (a few seconds of real speech, with video where the
#: container is a video container, so extraction has to pick the audio stream).
FORMATS: dict[str, list[str]] = {
    "mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
    "mkv": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "libopus"],
    "webm": ["-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus"],
    "mov": ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
    "mp3": ["-vn", "-c:a", "libmp3lame"],
    "wav": ["-vn", "-c:a", "pcm_s16le"],
    "flac": ["-vn", "-c:a", "flac"],
    "m4a": ["-vn", "-c:a", "aac"],
    "opus": ["-vn", "-c:a", "libopus"],
}


def make_variant(source: Path, dest: Path, seconds: float = 6.0) -> Path:
    ext = dest.suffix.lstrip(".")
    video = FORMATS[ext][0] != "-vn"
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-t", str(seconds), "-i", str(source)]
    if video:
        cmd += ["-f", "lavfi", "-t", str(seconds), "-i", "color=c=blue:s=64x48:r=10", "-map", "1:v", "-map", "0:a"]
    cmd += [*FORMATS[ext], str(dest)]
    subprocess.run(cmd, check=True, timeout=120)
    return dest


# -- harder speech, built from the repository's media (deterministic, never committed) ----------

RATE = 16000


def load_pcm(path: Path) -> np.ndarray:
    """Any media -> 16 kHz mono float32, through the bundled ffmpeg."""
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"]
    data = subprocess.run(cmd, check=True, capture_output=True, timeout=120).stdout
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(samples: np.ndarray, dest: Path) -> Path:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(dest), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return dest


def reference(data_dir: Path, name: str) -> str:
    return (data_dir / (name.rsplit(".", 1)[0] + ".ref.txt")).read_text()


def low_frequency_noise(seconds: float, seed: int = 7) -> np.ndarray:
    """Rumble and mains hum, as in a room with machinery: low-passed brown noise plus 50 Hz and
    its harmonics, loud below 300 Hz and nearly nothing in the speech bands."""
    from scipy.signal import butter, sosfilt

    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    brown = np.cumsum(rng.standard_normal(n))
    brown = sosfilt(butter(4, [5, 150], btype="bandpass", fs=RATE, output="sos"), brown)
    brown *= 0.25 / (np.abs(brown).max() + 1e-9)
    t = np.arange(n) / RATE
    hum = 0.2 * np.sin(2 * np.pi * 50 * t) + 0.12 * np.sin(2 * np.pi * 100 * t)
    hum += 0.08 * np.sin(2 * np.pi * 150 * t) + 0.05 * np.sin(2 * np.pi * 200 * t)
    return (brown + hum).astype(np.float32)


def speech_under_noise(data_dir: Path, dest: Path) -> tuple[Path, str, tuple[float, float]]:
    """jfk (clean) + talk_tts recorded "in another room": 32 dB quieter, under loud rumble and
    hum + jfk (clean). Returns the file, its reference and the noisy stretch in seconds."""
    jfk, talk = load_pcm(data_dir / "jfk.flac"), load_pcm(data_dir / "talk_tts.mp4")
    noisy = talk * 0.025 + low_frequency_noise(talk.size / RATE)
    gap = np.zeros(RATE, dtype=np.float32)
    audio = np.concatenate([jfk, gap, noisy, gap, jfk])
    start = (jfk.size + gap.size) / RATE
    ref = "\n".join([reference(data_dir, "jfk.flac"), reference(data_dir, "talk_tts.mp4"), reference(data_dir, "jfk.flac")])
    return write_wav(audio, dest), ref, (start, start + noisy.size / RATE)


def _pauses(audio: np.ndarray, min_pause_s: float = 0.5) -> list[int]:
    """Middles of the pauses between spoken phrases (frames 30 dB under the loudest)."""
    frame = RATE // 50
    n = audio.size // frame
    db = 10 * np.log10(np.maximum((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1), 1e-12))
    quiet = db < db.max() - 30
    out, run = [], 0
    for i, q in enumerate(quiet):
        run = run + 1 if q else 0
        if q and (i + 1 == n or not quiet[i + 1]) and run * frame >= min_pause_s * RATE:
            out.append((i - run // 2) * frame)
    return out


def long_with_pauses(data_dir: Path, dest: Path, seed: int = 5) -> tuple[Path, str]:
    """ivr_prompts with a 1-3 s pause after every prompt (each ends a sentence), then talk_tts
    and jfk after 2 s pauses: about six minutes of the pauses after sentence ends where
    Whisper, decoding a chunk, is tempted to stop early."""
    rng = np.random.default_rng(seed)
    ivr = load_pcm(data_dir / "ivr_prompts.mp4")
    pieces, last = [], 0
    for cut in _pauses(ivr):
        pieces.append(ivr[last:cut])
        pieces.append(np.zeros(int(rng.uniform(1.0, 3.0) * RATE), dtype=np.float32))
        last = cut
    pieces.append(ivr[last:])
    two = np.zeros(2 * RATE, dtype=np.float32)
    pieces += [two, load_pcm(data_dir / "talk_tts.mp4"), two, load_pcm(data_dir / "jfk.flac")]
    ref = "\n".join(reference(data_dir, n) for n in ("ivr_prompts.mp4", "talk_tts.mp4", "jfk.flac"))
    return write_wav(np.concatenate(pieces), dest), ref


def chords(dest: Path, seconds: float = 30.0) -> Path:
    """Music without words: sine chords (with harmonics) changing every 2 s."""
    t = np.arange(int(2 * RATE)) / RATE
    roots = [261.63, 220.0, 174.61, 196.0]  # C, A, F, G
    bars = []
    for i in range(int(seconds // 2)):
        root = roots[i % len(roots)]
        tone = sum(np.sin(2 * np.pi * root * r * t) / (1 + h) for r in (1, 1.26, 1.5) for h in range(2))
        envelope = np.minimum(1, t * 20) * np.exp(-t * 0.8)
        bars.append(0.15 * tone * envelope)
    return write_wav(np.concatenate(bars).astype(np.float32), dest)


def noise(dest: Path, seconds: float = 20.0, seed: int = 3) -> Path:
    """Broadband noise (a fan, a waterfall) with a slow swell."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    swell = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(n) / RATE / 7)
    return write_wav((0.1 * rng.standard_normal(n) * swell).astype(np.float32), dest)


def make_silence(dest: Path, seconds: float, *, declared: bool = True) -> Path:
    """FLAC of ``seconds`` of silence, tiny however long (ten hours: ~70 kB in ~2 s): the
    "decompression bomb" of audio. ``declared=False`` writes it through a pipe, so its header
    holds no length (ffmpeg shows ``Duration: N/A``) and only decoding can tell how long it is."""
    cmd = [
        ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono:nb_samples=65535",
        "-t", str(seconds), "-c:a", "flac", "-frame_size", "65535", "-compression_level", "0", "-f", "flac",
    ]
    if declared:
        subprocess.run([*cmd, str(dest)], check=True, timeout=120)
    else:
        with dest.open("wb") as out:
            subprocess.run([*cmd, "pipe:1"], check=True, timeout=120, stdout=out)
    return dest
