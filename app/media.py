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
import shutil
from pathlib import Path

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
