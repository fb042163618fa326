"""Media files as every process sees them, before any decoding: where ffmpeg is, which
containers vtp accepts, and the cheap checks on an input file.

Shared by ``workers.audio`` (extraction) and by what accepts uploads (``app.submit``, the web
process), which must not import the speech stack: this module imports nothing but the standard library.

The ffmpeg binary is ``$VTP_FFMPEG`` if set, else the one inside the ``imageio-ffmpeg``
wheel (so a bare ``pip install`` is enough), else ``ffmpeg`` on PATH.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import anyio

from app import errors

#: Demuxers vtp accepts: media containers and raw audio formats, never playlists or devices.
DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,asf,mpegts,mpeg,mpegps,ogg,mp3,wav,w64,flac,"
    "aac,ac3,eac3,dts,aiff,caf,amr,amrnb,amrwb,au,wv,ape,mpc,mpc8,tta,tak,dsf,rm,nut,mxf,gxf,"
    "dv,ivf,voc,sox,xwma,wsaud,truehd,mlp,opus"
)


@functools.cache
def ffmpeg_exe() -> str:
    if exe := os.environ.get("VTP_FFMPEG"):
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        pass
    if exe := shutil.which("ffmpeg"):
        return exe
    raise errors.OptionsError("no ffmpeg found: install the imageio-ffmpeg wheel or set VTP_FFMPEG")


def check_input_file(path: Path, *, max_bytes: int | None = None) -> int:
    """Cheap checks before ffmpeg runs; returns the size in bytes."""
    if not path.exists():
        raise errors.InputNotFound(f"{path}: file not found")
    if path.is_dir():
        raise errors.InputNotFound(f"{path}: is a directory, not a media file")
    if not path.is_file():
        raise errors.UnsupportedFormat(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise errors.EmptyMedia(f"{path.name}: the file is empty (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise errors.MediaTooLarge(f"{path.name}: {size / 1e6:.0f} MB is over the {max_bytes / 1e6:.0f} MB limit")
    return size


#: ffmpeg's own words -> the reason a user reads.
_STDERR_REASONS: tuple[tuple[str, type[errors.InputError], str], ...] = (
    ("matches no streams", errors.NoAudioStream, "no audio stream: the file has no audio track to transcribe"),
    ("does not contain any stream", errors.NoAudioStream, "no audio stream: the file has no audio track to transcribe"),
    ("moov atom not found", errors.CorruptMedia, "not a readable MP4/MOV: the file is truncated or is not a video (moov atom not found)"),
    ("not on whitelist", errors.UnsupportedFormat, "unsupported input format: playlists, devices and network references are refused"),
    ("No such file or directory", errors.InputNotFound, "file not found"),
    ("Permission denied", errors.InputNotFound, "permission denied"),
    ("Invalid data found when processing input", errors.CorruptMedia, "not a media file ffmpeg can read (corrupt, truncated or not audio/video)"),
    ("EBML header parsing failed", errors.CorruptMedia, "not a readable Matroska/WebM file (corrupt or truncated)"),
)


def reason_from_stderr(stderr: str, name: str) -> errors.InputError:
    for needle, kind, reason in _STDERR_REASONS:
        if needle in stderr:
            return kind(f"{name}: {reason}")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "unknown error")
    return errors.CorruptMedia(f"{name}: ffmpeg could not decode it ({last})")


def safe_basename(name: str) -> str:
    """A file stem that is safe in any directory: no separators, no dot-files, bounded length."""
    stem = Path(name).stem if "." in Path(name).name else Path(name).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem[:120] or "transcript"


_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_AUDIO_STREAM = re.compile(r"Stream #\d+:\d+.*?: Audio:")


async def probe_duration(path: Path, *, name: str, timeout: float = 30.0) -> float:
    """What ffmpeg's header parse says of ``path``, before any decoding: its duration in
    seconds (0.0 when the container does not say), or the ``InputError`` a full decode
    would end with (not media, refused container, no audio stream). Cheap: reads headers only."""
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin",
        "-protocol_whitelist", "file", "-format_whitelist", DEMUXERS, "-i", f"file:{path}",
    ]
    try:
        with anyio.fail_after(timeout):
            done = await anyio.run_process(cmd, stdin=subprocess.DEVNULL, check=False)
    except TimeoutError:
        raise errors.CorruptMedia(f"{name}: ffmpeg could not read its headers within {timeout:g} s") from None
    except OSError as exc:
        raise errors.OptionsError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc
    stderr = done.stderr.decode("utf-8", "replace")[-65536:]
    if "Input #0" not in stderr:  # ffmpeg found no container it may open
        raise reason_from_stderr(stderr, name)
    if not _AUDIO_STREAM.search(stderr):
        raise errors.NoAudioStream(f"{name}: no audio stream: the file has no audio track to transcribe")
    match = _DURATION.search(stderr)
    if not match:
        return 0.0
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def check_duration(duration: float, *, name: str, max_duration: float) -> None:
    """``MediaTooLong`` when ``duration`` is over ``max_duration`` seconds (0: no limit)."""
    if max_duration > 0 and duration > max_duration:
        raise errors.MediaTooLong(
            f"{name}: {duration:.0f} s of media is over the {max_duration:.0f} s limit (VTP_MAX_DURATION)"
        )
