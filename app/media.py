"""Media files as every process sees them, before any decoding: where ffmpeg is, which
containers vtp accepts, and the cheap checks on an input file.

Shared by ``workers.audio`` (extraction) and by what accepts uploads (``app.submit``, the web
process), which must not import the speech stack: this module imports nothing but the standard
library and anyio. ``check_media`` is the one check an upload goes through before it is
accepted: the cheap file checks, then the container's declared duration against
``VTP_MAX_DURATION`` (a few kB of FLAC can declare ten hours of audio).

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


#: Seconds a probe (headers only) may take; a file that outlasts it is probed no further and its
#: length is enforced while it is extracted instead.
PROBE_TIMEOUT_S = 30.0
#: The input's own line is indented exactly two spaces; metadata (which a file chooses) is
#: indented four or more, so a tag cannot pose as the duration.
_DURATION_RE = re.compile(r"^  Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.MULTILINE)


def input_args(path: Path) -> list[str]:
    """ffmpeg's arguments for reading ``path``: the file protocol and media demuxers only, so a
    file named ``http://...`` or a playlist pointing at other files or URLs is refused, not followed."""
    return ["-protocol_whitelist", "file", "-format_whitelist", DEMUXERS, "-i", f"file:{path}"]


async def probe_duration(path: Path, *, timeout: float = PROBE_TIMEOUT_S) -> float | None:
    """The duration the container declares, in seconds, read from ffmpeg's ``Duration:`` line;
    None when it declares none (``N/A``: a piped or raw stream), when ffmpeg cannot read the file
    (extraction reports why), or when reading the headers takes longer than ``timeout``."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", *input_args(path)]
    tail = b""
    try:
        process = await anyio.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError as exc:
        raise errors.OptionsError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc
    async with process:
        with anyio.move_on_after(timeout) as scope:
            assert process.stderr is not None
            async for data in process.stderr:
                tail = (tail + data)[-65536:]  # a hostile file can make ffmpeg log a lot
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
            return None
    # ffmpeg exits 1 here ("At least one output file must be specified"): the header is what counts.
    # The last match: the file's name, printed before it, could hold a line like it.
    found = _DURATION_RE.findall(tail.decode("utf-8", "replace"))
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def describe_seconds(seconds: float) -> str:
    """``45 s``, ``12 min``, ``10.0 h``: durations as a user reads them."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def too_long(name: str, seconds: float | None, max_seconds: float) -> errors.MediaTooLong:
    """The one-line refusal; ``seconds`` None when decoding was cut at the limit (how much more is unknown)."""
    limit = describe_seconds(max_seconds)
    if seconds is None:
        return errors.MediaTooLong(f"{name}: it decodes to more audio than the {limit} limit (VTP_MAX_DURATION)")
    if describe_seconds(seconds) == limit:  # just over: show the difference
        return errors.MediaTooLong(f"{name}: {seconds:.1f} s of audio is over the {max_seconds:.1f} s limit (VTP_MAX_DURATION)")
    return errors.MediaTooLong(f"{name}: {describe_seconds(seconds)} of audio is over the {limit} limit (VTP_MAX_DURATION)")


async def check_media(
    path: Path,
    *,
    max_bytes: int | None = None,
    max_seconds: float | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> float | None:
    """What an upload must pass before it becomes a job (``vtp submit``, the web process):
    ``check_input_file``, then, with a duration limit, the declared duration against it
    (``MediaTooLong``). Returns the declared duration (None: unknown, or no limit to check).
    A file that declares no duration is accepted here; extraction enforces the limit on what
    it actually decodes."""
    check_input_file(path, max_bytes=max_bytes)
    if not max_seconds:
        return None
    declared = await probe_duration(path, timeout=timeout)
    if declared is not None and declared > max_seconds:
        raise too_long(path.name, declared, max_seconds)
    return declared
