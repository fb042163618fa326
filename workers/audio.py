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
from app.media import DEMUXERS, check_input_file, ffmpeg_exe, reason_from_stderr
from app.messages import SAMPLE_RATE

__all__ = ["DEMUXERS", "check_input_file", "ffmpeg_exe", "extract_pcm", "pcm_to_float", "reason_from_stderr"]


def ffmpeg_command(source: Path, dest: Path) -> list[str]:
    stream = (
        ffmpeg.input(f"file:{source}", protocol_whitelist="file", format_whitelist=DEMUXERS)
        .output(str(dest), map="0:a:0", vn=None, sn=None, dn=None, ac=1, ar=SAMPLE_RATE, f="s16le", acodec="pcm_s16le")
        .global_args("-nostdin", "-hide_banner", "-nostats", "-v", "error")
        .overwrite_output()
    )
    return stream.compile(cmd=ffmpeg_exe())


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
            raise errors.CorruptMedia(f"{name}: ffmpeg did not finish decoding within {timeout:g} s") from None
    return process.returncode or 0, tail.decode("utf-8", "replace")


def pcm_to_float(data: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1), what the VAD and Whisper take."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
