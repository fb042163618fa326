"""Audio extraction: any container ffmpeg reads -> 16 kHz mono s16le PCM.

The ffmpeg binary and the demuxer whitelist come from ``app.media``. ffmpeg-python builds
the command line; ffmpeg's stderr is mapped onto ``app.errors`` so users read a reason,
not an exit code.

Hostile input: the path is passed as ``file:<path>`` with ``protocol_whitelist=file`` and a
``format_whitelist`` of audio/video demuxers, so a file named ``http://...`` or a playlist
(HLS, concat, ffconcat) that points at other files or URLs is refused, not followed. A file that
decodes to more audio than ``VTP_MAX_DURATION`` (a few kB of FLAC can hold hours of silence) is
refused from its declared duration before decoding starts, and, when it declares none or lies,
by capping ffmpeg's output just past the limit (``-t``) and checking what came out.

Progress: ffmpeg writes ``-progress`` blocks to stdout (``out_time_us``: audio decoded so
far), read while it runs and passed on as seconds done / seconds in all.
"""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import ffmpeg
import numpy as np

from app import errors
from app.media import (
    DEMUXERS,
    check_duration,
    check_input_file,
    ffmpeg_exe,
    probe_duration,
    reason_from_stderr,
    too_long,
)
from app.messages import SAMPLE_RATE

__all__ = ["DEMUXERS", "check_input_file", "ffmpeg_exe", "extract_pcm", "pcm_to_float", "reason_from_stderr"]


#: The output is cut this far past the duration limit: enough to tell "over" from "exactly at".
CAP_MARGIN_S = 1.0
#: Seconds between ffmpeg's progress reports.
PROGRESS_PERIOD_S = 0.5


def ffmpeg_command(source: Path, dest: Path, *, max_seconds: float | None = None, progress: bool = False) -> list[str]:
    out: dict = dict(map="0:a:0", vn=None, sn=None, dn=None, ac=1, ar=SAMPLE_RATE, f="s16le", acodec="pcm_s16le")
    if max_seconds:
        out["t"] = f"{max_seconds + CAP_MARGIN_S:g}"
    stream = (
        ffmpeg.input(f"file:{source}", protocol_whitelist="file", format_whitelist=DEMUXERS)
        .output(str(dest), **out)
        .global_args("-nostdin", "-hide_banner", "-nostats", "-v", "error")
        .overwrite_output()
    )
    if progress:
        stream = stream.global_args("-progress", "pipe:1", "-stats_period", f"{PROGRESS_PERIOD_S:g}")
    return stream.compile(cmd=ffmpeg_exe())


async def extract_pcm(
    source: Path,
    dest: Path,
    *,
    name: str,
    timeout: float,
    max_seconds: float | None = None,
    progress: Callable[[float, float], Awaitable[None]] | None = None,
) -> float:
    """Decode the first audio stream of ``source`` into ``dest`` as PCM; returns its duration.

    With ``max_seconds``, more audio than that is ``MediaTooLong``: at once if the container
    declares it, else as soon as ffmpeg has decoded just past the limit. ``progress`` (see
    ``workers.stages.Progress``) hears (seconds decoded, seconds declared or 0) as it goes,
    and last (the true length, the true length)."""
    check_input_file(source)
    # headers first: what is not media (or has no audio) or declares too much is refused at once
    total = await probe_duration(source, name=name)
    check_duration(total, name=name, max_duration=max_seconds or 0.0)
    if progress is not None:
        await progress(0.0, total)

    async def on_progress(done: float) -> None:
        assert progress is not None
        # a header may understate the length: never report more done than in all
        await progress(done, max(total, done) if total else 0.0)

    cmd = ffmpeg_command(source, dest, max_seconds=max_seconds, progress=progress is not None)
    returncode, stderr = await run_bounded(
        cmd, timeout=timeout, name=name, on_progress=on_progress if progress is not None else None
    )
    if returncode != 0:
        raise reason_from_stderr(stderr, name)
    samples = dest.stat().st_size // 2 if dest.exists() else 0
    if samples == 0:
        raise errors.CorruptMedia(f"{name}: the audio stream holds no decodable samples")
    duration = samples / SAMPLE_RATE
    if max_seconds and duration > max_seconds:
        raise too_long(name, None, max_seconds)  # cut at the cap: how much more is unknown
    if progress is not None:  # all done, and now the true length (a container may declare more)
        await progress(duration, duration)
    return duration


async def _read_progress(stream: anyio.abc.ByteReceiveStream, on_progress: Callable[[float], Awaitable[None]]) -> None:
    """ffmpeg's ``-progress`` blocks (``key=value`` lines, each block ending ``progress=...``)
    -> seconds of output written, once per block."""
    buffer = b""
    done = 0.0
    async for data in stream:
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            key, _, value = line.strip().partition(b"=")
            if key == b"out_time_us":
                try:
                    done = max(done, int(value) / 1e6)
                except ValueError:  # "N/A" before the first frame
                    pass
            elif key == b"progress":
                await on_progress(done)
        buffer = buffer[-4096:]  # lines are short; a runaway one is not kept


async def run_bounded(
    cmd: list[str],
    *,
    timeout: float,
    name: str,
    keep: int = 65536,
    on_progress: Callable[[float], Awaitable[None]] | None = None,
) -> tuple[int, str]:
    """Run ffmpeg; keep only the tail of stderr (corrupt streams log an error per frame) and
    kill it, waiting for it to be reaped, if it outlives ``timeout`` or the caller gives up.
    With ``on_progress``, ffmpeg's ``-progress`` blocks on stdout are read as it runs."""
    tail = b""
    try:
        process = await anyio.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if on_progress else subprocess.DEVNULL
        )
    except OSError as exc:
        raise errors.OptionsError(f"cannot run ffmpeg ({cmd[0]}): {exc}") from exc

    async def read_stderr() -> None:
        nonlocal tail
        assert process.stderr is not None
        async for data in process.stderr:
            tail = (tail + data)[-keep:]

    async with process:
        try:
            with anyio.fail_after(timeout):
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(read_stderr)
                        if on_progress is not None:
                            assert process.stdout is not None
                            tg.start_soon(_read_progress, process.stdout, on_progress)
                except BaseExceptionGroup as group:  # a failing progress sink: raise its own error
                    if len(group.exceptions) == 1:
                        raise group.exceptions[0] from None
                    raise
                await process.wait()
        except TimeoutError:
            await _kill(process)
            # A busy or slow host as often as a pathological file: transient (retried, then failed
            # with this reason once the tries are used up).
            raise errors.ResourceError(f"{name}: ffmpeg did not finish decoding within {timeout:g} s") from None
        except BaseException:
            await _kill(process)
            raise
    return process.returncode or 0, tail.decode("utf-8", "replace")


async def _kill(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.kill()
    with anyio.CancelScope(shield=True):
        await process.wait()


def pcm_to_float(data: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1), what the VAD and Whisper take."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
