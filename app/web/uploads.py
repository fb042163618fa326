"""Uploads: request bodies streamed to a spool file under a size limit, never held in memory.

A multipart upload is read part by part; the ``file`` part goes to disk in 64 KiB pieces and
is cut off with 413 (``MediaTooLarge``) the moment it passes ``VTP_MAX_UPLOAD_MB`` — a
``Content-Length`` already over the limit is refused before a byte is read. A URL upload
(``{"url": ...}``) is downloaded the same way through the SSRF guard. Then ffmpeg reads the
headers (``app.media.probe_duration``): not media -> 415, media longer than
``VTP_MAX_DURATION`` -> 413, each with a one-line reason. Only then is a job created, and
``app.submit`` copies the spool file into storage.

Nothing waits on a client without limit: every read (a part's headers, a text field, each
piece of the file, a JSON body) gives up after ``idle_s`` (60 s) without a byte and the
request is answered 408 (``UploadStalled``); a part's headers, a text field and a JSON body
must each arrive whole within that time. A text field may arrive in any number of TCP reads.

The client's filename is display text only: ``safe_filename`` keeps its last path component,
without control characters, so ``../../etc/passwd`` can name nothing but a job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import anyio
from aiohttp import BodyPartReader, web

from app import errors
from app.media import check_duration, probe_duration
from app.netguard import Guard, fetch

CHUNK = 1 << 16
#: Text fields of a multipart form: how many, and how long each may be.
MAX_FIELDS = 32
MAX_FIELD_BYTES = 8192
#: Seconds a URL download may take.
DOWNLOAD_TIMEOUT_S = 600.0
#: Seconds an upload may send nothing before it is dropped (a stalled or trickling client
#: must not hold a connection and a spool file forever).
IDLE_TIMEOUT_S = 60.0
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]+")


def safe_filename(raw: str | None) -> str:
    """The last path component of a client-supplied name, as harmless display text."""
    name = unquote(raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    return name[:200] or "upload"


@dataclass
class Upload:
    path: Path
    name: str
    size: int
    #: Of the bytes received, computed while they streamed in.
    sha256: str = ""
    #: Text fields of the form (each may repeat, e.g. ``timestamp_granularities[]``).
    fields: dict[str, list[str]] = field(default_factory=dict)

    def field(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default


def too_large(size: int, max_bytes: int) -> errors.MediaTooLarge:
    return errors.MediaTooLarge(
        f"upload of {size / 1e6:.1f} MB or more is over the {max_bytes / 1e6:.0f} MB limit (VTP_MAX_UPLOAD_MB)"
    )


class Spool:
    """A directory of in-flight uploads; each is deleted when its request ends."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="vtp-web-spool-"))
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def file(self) -> AsyncIterator[Path]:
        path = self.root / uuid.uuid4().hex
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def _write_stream(chunks: AsyncIterator[bytes], path: Path, max_bytes: int | None) -> tuple[int, str]:
    """Write to ``path``, counting and hashing as it goes; (size, sha256)."""
    size = 0
    digest = hashlib.sha256()
    with path.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise too_large(size, max_bytes)
            digest.update(chunk)
            out.write(chunk)  # 64 KiB into the page cache: cheaper than a thread hop
    return size, digest.hexdigest()


class UploadStalled(errors.InputError):
    """The client stopped sending mid-upload (408)."""


async def _part_chunks(part: BodyPartReader, idle_s: float = IDLE_TIMEOUT_S) -> AsyncIterator[bytes]:
    while True:
        try:
            with anyio.fail_after(idle_s):
                chunk = await part.read_chunk(CHUNK)
        except TimeoutError:
            raise UploadStalled(f"the upload stalled: nothing received for {idle_s:g} s") from None
        if not chunk:
            return
        yield chunk


def _stalled(idle_s: float, what: str) -> UploadStalled:
    return UploadStalled(f"the upload stalled: {what} did not arrive within {idle_s:g} s")


async def _next_part(reader, idle_s: float):
    """The next part, its headers read within ``idle_s``."""
    try:
        with anyio.fail_after(idle_s):
            return await reader.next()
    except TimeoutError:
        raise _stalled(idle_s, "a form part's headers") from None


async def _read_field(part: BodyPartReader, idle_s: float) -> str:
    """A text field, whole, however many reads its bytes take; at most MAX_FIELD_BYTES."""
    data = bytearray()
    try:
        with anyio.fail_after(idle_s):
            # Never read_chunk(n) with a small n: aiohttp asserts n >= its boundary length.
            while chunk := await part.read_chunk(CHUNK):
                data += chunk
                if len(data) > MAX_FIELD_BYTES:
                    raise errors.OptionsError(f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    except TimeoutError:
        raise _stalled(idle_s, f"form field {part.name!r}") from None
    return data.decode("utf-8", "replace")


async def receive_multipart(
    request: web.Request, path: Path, *, max_bytes: int | None, idle_s: float = IDLE_TIMEOUT_S
) -> Upload:
    """Stream the ``file`` part of a multipart request to ``path``; collect the text fields."""
    if max_bytes is not None and request.content_length and request.content_length > max_bytes + 65536:
        raise too_large(request.content_length, max_bytes)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise errors.OptionsError(f"expected multipart/form-data: {exc}") from None
    fields: dict[str, list[str]] = {}
    name: str | None = None
    size = 0
    sha = ""
    count = 0
    try:
        while (part := await _next_part(reader, idle_s)) is not None:
            count += 1
            if count > MAX_FIELDS or not isinstance(part, BodyPartReader):
                raise errors.OptionsError("too many or nested form parts")
            if part.name == "file":
                if name is not None:
                    raise errors.OptionsError("one file per request")
                name = safe_filename(part.filename)
                size, sha = await _write_stream(_part_chunks(part, idle_s), path, max_bytes)
            elif part.name:
                fields.setdefault(part.name, []).append(await _read_field(part, idle_s))
    except (AssertionError, ValueError) as exc:  # aiohttp's word for a malformed body
        raise errors.OptionsError(f"malformed multipart/form-data body: {exc}") from None
    if name is None:
        raise errors.OptionsError("no file: send the media as the multipart field 'file'")
    if size == 0:
        raise errors.EmptyMedia(f"{name}: the file is empty (0 bytes)")
    return Upload(path, name, size, sha, fields)


async def read_body(request: web.Request, *, idle_s: float = IDLE_TIMEOUT_S) -> bytes:
    """A small request body (JSON; at most the app's ``client_max_size``), whole within ``idle_s``."""
    try:
        with anyio.fail_after(idle_s):
            return await request.read()
    except TimeoutError:
        raise _stalled(idle_s, "the request body") from None


def _name_from(resp, url: str) -> str:
    disposition = resp.content_disposition
    if disposition is not None and disposition.filename:
        return safe_filename(disposition.filename)
    return safe_filename(resp.url.path.rsplit("/", 1)[-1] or url)


async def receive_url(guard: Guard, url: str, path: Path, *, max_bytes: int | None) -> Upload:
    """Download ``url`` (public addresses only, see app.netguard) to ``path``."""
    async with fetch(guard, url, timeout=DOWNLOAD_TIMEOUT_S, what="url") as resp:
        if resp.status != 200:
            raise errors.InputNotFound(f"url: the server answered HTTP {resp.status}")
        if max_bytes is not None and resp.content_length and resp.content_length > max_bytes:
            raise too_large(resp.content_length, max_bytes)
        name = _name_from(resp, url)
        try:
            size, sha = await _write_stream(resp.content.iter_chunked(CHUNK), path, max_bytes)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.InputNotFound(f"url: download failed: {exc or type(exc).__name__}") from None
    if size == 0:
        raise errors.EmptyMedia(f"{name}: the download is empty (0 bytes)")
    return Upload(path, name, size, sha)


async def check_media(upload: Upload, *, max_duration: float, limiter: anyio.Semaphore) -> float:
    """ffmpeg reads the headers: 415 for what is not media with audio, 413 when too long."""
    async with limiter:  # one ffmpeg per core at a time, however many uploads arrive at once
        duration = await probe_duration(upload.path, name=upload.name)
    check_duration(duration, name=upload.name, max_duration=max_duration)
    return duration


def default_probe_limit() -> int:
    return max(os.cpu_count() or 1, 1) * 2
