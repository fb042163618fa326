"""Test media made on the fly from tests/data with the bundled ffmpeg (never committed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
