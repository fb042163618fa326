"""Audio extraction: any container ffmpeg reads -> 16 kHz mono s16le PCM.

The ffmpeg binary and the demuxer whitelist come from ``app.media``. ffmpeg-python builds
the command line; ffmpeg's stderr is mapped onto ``app.errors`` so users read a reason,
not an exit code.

Hostile input: the path is passed as ``file:<path>`` with ``protocol_whitelist=file`` and a
``format_whitelist`` of audio/video demuxers, so a file named ``http://...`` or a playlist
(HLS, concat, ffconcat) that points at other files or URLs is refused, not followed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import ffmpeg
import numpy as np

from app import errors
from app.media import DEMUXERS, check_input_file, ffmpeg_exe
from app.messages import SAMPLE_RATE

__all__ = ["DEMUXERS", "check_input_file", "ffmpeg_exe", "extract_pcm", "pcm_to_float"]

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


def ffmpeg_command(source: Path, dest: Path) -> list[str]:
    stream = (
        ffmpeg.input(f"file:{source}", protocol_whitelist="file", format_whitelist=DEMUXERS)
        .output(str(dest), map="0:a:0", vn=None, sn=None, dn=None, ac=1, ar=SAMPLE_RATE, f="s16le", acodec="pcm_s16le")
        .global_args("-nostdin", "-hide_banner", "-nostats", "-v", "error")
        .overwrite_output()
    )
    return stream.compile(cmd=ffmpeg_exe())


#: ffmpeg's words for a machine problem, not a media problem: retried, never blamed on the input.
_RESOURCE_NEEDLES = ("No space left on device", "Disk quota exceeded", "Cannot allocate memory")


def reason_from_stderr(stderr: str, name: str) -> errors.InputError | errors.ResourceError:
    for needle in _RESOURCE_NEEDLES:
        if needle in stderr:
            return errors.ResourceError(f"{name}: ffmpeg could not write the audio: {needle.lower()}")
    for needle, kind, reason in _STDERR_REASONS:
        if needle in stderr:
            return kind(f"{name}: {reason}")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "unknown error")
    return errors.CorruptMedia(f"{name}: ffmpeg could not decode it ({last})")


async def extract_pcm(source: Path, dest: Path, *, name: str, timeout: float) -> float:
    """Decode the first audio stream of ``source`` into ``dest`` as PCM; returns its duration."""
    check_input_file(source)
    cmd = ffmpeg_command(source, dest)
    returncode, stderr = await run_bounded(cmd, timeout=timeout, name=name)
    if returncode != 0:
        raise reason_from_stderr(stderr, name)
    samples = dest.stat().st_size // 2 if dest.exists() else 0
    if samples == 0:
        raise errors.CorruptMedia(f"{name}: the audio stream holds no decodable samples")
    return samples / SAMPLE_RATE


async def run_bounded(cmd: list[str], *, timeout: float, name: str, keep: int = 65536) -> tuple[int, str]:
    """Run ffmpeg; keep only the tail of stderr (corrupt streams log an error per frame) and
    kill it, waiting for it to be reaped, if it outlives ``timeout``."""
    tail = b""
    try:
        process = await anyio.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError as exc:
        raise errors.OptionsError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc
    async with process:
        try:
            with anyio.fail_after(timeout):
                assert process.stderr is not None
                async for data in process.stderr:
                    tail = (tail + data)[-keep:]
                await process.wait()
        except TimeoutError:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
            # A busy or slow host as often as a pathological file: transient (retried, then failed
            # with this reason once the tries are used up).
            raise errors.ResourceError(f"{name}: ffmpeg did not finish decoding within {timeout:g} s") from None
    return process.returncode or 0, tail.decode("utf-8", "replace")


def pcm_to_float(data: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1), what the VAD and Whisper take."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
