"""A job's media, subtitles and speech timeline, for the job page and for other clients.

    GET /v1/jobs/{id}/media           the upload itself, as uploaded (bearer token; HTTP Range)
    GET /v1/jobs/{id}/audio.wav       an audio-only rendition: the extract stage's 16 kHz PCM as WAV (Range)
    GET /v1/jobs/{id}/timeline        cues, VAD speech, where words landed, unheard speech, signed links
    GET /media/{id}/{name}?exp=&sig=  ``media``, ``audio.wav`` or ``subtitles.vtt`` through a signed link

``<video>``, ``<audio>`` and ``<track>`` cannot send an ``Authorization`` header, so the page
asks ``/timeline`` (with its bearer token) for links signed with a key derived from the job
owner's token (``Tokens.link_key``): valid ``LINK_TTL_S``, for that one job and file. A link
with a bad signature, an expired one, or one for a job its signer does not own is answered 404,
like a job that does not exist; so is every ``/v1/`` path here for another token's job.

Ranges are read from storage as they are asked for (``Storage.get_range``: a file seek, or an
S3 ranged GET), never the whole object: one ``bytes=`` range gets 206 with ``Content-Range``,
a range past the end 416, several ranges or a malformed header the whole object (200), which
RFC 9110 allows. The WAV rendition is a 44-byte header in front of the PCM the extract stage
already stored (kept until the job's artifacts expire): nothing is encoded and nothing new is
stored, for 32 kB per second of audio, which any connection streams in real time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mimetypes
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from app import dag, errors, formats, keys
from app.messages import SAMPLE_RATE, JobRecord, Transcript
from app.web.api import owned
from app.web.state import state

log = logging.getLogger("vtp.web")

#: Seconds a signed media link stays valid: a long lecture stays playable on an open page.
LINK_TTL_S = 12 * 3600
#: Bytes read from storage and written per step while streaming a range.
CHUNK = 1 << 20
#: Word spans closer than this are drawn as one on the timeline (seconds).
WORD_GAP_S = 0.25
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
WAV_HEADER_BYTES = 44


@dataclass(frozen=True)
class Source:
    """Something to serve by byte ranges: its length, a ranged reader, its type and validator."""

    size: int
    read: Callable[[int, int], Awaitable[bytes]]
    content_type: str
    etag: str


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """``(start, end)`` inclusive for one satisfiable range; ``None`` to send the whole object
    (no header, a malformed one, several ranges); ``False`` for a range past the end (416)."""
    if not header:
        return None
    m = _RANGE.match(header.replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # bytes=-N: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(size - n, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return False
    return start, min(end, size - 1)


async def serve(request: web.Request, source: Source, *, disposition: str = "inline") -> web.StreamResponse:
    """The source, or the one range the request asks for, streamed in ``CHUNK`` steps."""
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": source.content_type,
        "ETag": source.etag,
        "Cache-Control": "private, max-age=600",
        "Content-Disposition": disposition,
    }
    wanted = parse_range(request.headers.get("Range"), source.size)
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != source.etag:
        wanted = None  # the client's copy is another version: send the whole object
    if wanted is False:
        headers["Content-Range"] = f"bytes */{source.size}"
        return web.Response(status=416, headers=headers)
    if wanted is None:
        status, start, end = 200, 0, source.size - 1
    else:
        status, (start, end) = 206, wanted
        headers["Content-Range"] = f"bytes {start}-{end}/{source.size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start + 1
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    offset = start
    try:
        while offset <= end:
            data = await source.read(offset, min(CHUNK, end - offset + 1))
            if not data:  # shorter than it said (changed underneath): stop, the client sees it short
                break
            await resp.write(data)
            offset += len(data)
    except errors.VtpError as exc:  # headers are gone: all that is left is to end the response
        log.warning("%s %s: stopped at byte %d: %s", request.method, request.path, offset, exc)
    except ConnectionResetError:  # the player went elsewhere (a seek): normal
        pass
    return resp


def wav_header(pcm_bytes: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for 16-bit mono little-endian PCM."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + pcm_bytes, b"WAVE", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16, b"data", pcm_bytes,
    )


async def upload_source(request: web.Request, record: JobRecord) -> Source:
    storage = state(request).storage
    key = record.media_key or keys.media_key(record.id)
    if not await storage.exists(key):
        raise errors.JobNotFound(f"job {record.id} has no media any more (its artifacts expired or were deleted)")
    size = await storage.size(key)
    guessed = mimetypes.guess_type(record.input_name or "")[0] or "application/octet-stream"
    return Source(size, lambda start, n: storage.get_range(key, start, n), guessed, f'"{record.id}-m{size}"')


async def wav_source(request: web.Request, record: JobRecord) -> Source:
    storage = state(request).storage
    key = keys.audio_key(record.id)
    if not await storage.exists(key):
        raise errors.JobNotFound(f"job {record.id} has no extracted audio (not extracted yet, or expired)")
    pcm = await storage.size(key)
    header = wav_header(pcm)

    async def read(start: int, n: int) -> bytes:
        head = header[start : start + n]
        rest = n - len(head)
        if rest <= 0:
            return head
        return head + await storage.get_range(key, max(start - WAV_HEADER_BYTES, 0), rest)

    return Source(WAV_HEADER_BYTES + pcm, read, "audio/wav", f'"{record.id}-w{pcm}"')


async def review_doc(request: web.Request, record: JobRecord) -> bytes:
    """The job's whole transcript as JSON: the review artifact, or the JSON output of a job
    rendered before there was one; 409 before the job is done, 404 when neither exists."""
    if record.state != dag.DONE:
        raise errors.JobError(f"job {record.id} is {record.state}, not done" + (f": {record.error}" if record.error else ""))
    storage = state(request).storage
    for key in (keys.review_key(record.id), record.outputs.get("json")):
        if key and await storage.exists(key):
            return await storage.get_bytes(key)
    raise errors.JobNotFound(f"job {record.id} has no stored transcript to review (ask for the json format)")


async def subtitles(request: web.Request, record: JobRecord) -> web.Response:
    try:
        transcript = msgspec.json.decode(await review_doc(request, record), type=Transcript)
    except msgspec.DecodeError as exc:
        raise errors.JobError(f"job {record.id}: its stored transcript is unreadable: {exc}") from None
    return web.Response(
        body=formats.to_vtt(transcript), headers={"Content-Type": formats.MEDIA_TYPES["vtt"], "Cache-Control": "private, max-age=600"}
    )


def merged(spans: list[tuple[float, float]], gap: float = 0.0) -> list[list[float]]:
    """Sorted, with spans that overlap or lie within ``gap`` of each other joined."""
    out: list[list[float]] = []
    for start, end in sorted((float(a), float(b)) for a, b in spans if b > a):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [[round(a, 3), round(b, 3)] for a, b in out]


# -- signed links -------------------------------------------------------------------------------


def _signature(key: bytes, job_id: str, name: str, exp: int) -> str:
    return hmac.new(key, f"{job_id}\0{name}\0{exp}".encode(), hashlib.sha256).hexdigest()[:32]


def signed_link(key: bytes, job_id: str, name: str, *, now: float | None = None) -> str:
    exp = int((now if now is not None else time.time()) + LINK_TTL_S)
    return f"/media/{job_id}/{name}?exp={exp}&sig={_signature(key, job_id, name, exp)}"


async def _linked(request: web.Request) -> JobRecord:
    """The job a signed link names, if its signature, expiry and owner check out; 404 otherwise."""
    st = state(request)
    job_id, name = request.match_info["id"], request.match_info["name"]
    refused = errors.JobNotFound(f"no media at this link (it expired, or is not a link to job {job_id!r})")
    try:
        exp = int(request.query.get("exp", ""))
    except ValueError:
        raise refused from None
    if exp < time.time() or not _JOB_ID.match(job_id):
        raise refused
    record = await st.store.find(job_id)
    key = st.tokens.link_key(record.owner) if record is not None else b""
    if record is None or not key or not hmac.compare_digest(_signature(key, job_id, name, exp), request.query.get("sig", "")):
        raise refused
    return record


# -- handlers -----------------------------------------------------------------------------------


async def media(request: web.Request) -> web.StreamResponse:
    record = await owned(request)
    return await serve(request, await upload_source(request, record))


async def audio_wav(request: web.Request) -> web.StreamResponse:
    record = await owned(request)
    return await serve(request, await wav_source(request, record))


async def linked(request: web.Request) -> web.StreamResponse:
    record = await _linked(request)
    name = request.match_info["name"]
    if name == "media":
        return await serve(request, await upload_source(request, record))
    if name == "audio.wav":
        return await serve(request, await wav_source(request, record))
    return await subtitles(request, record)


class Cue(msgspec.Struct, frozen=True):
    start: float
    end: float
    text: str


class Links(msgspec.Struct, frozen=True):
    """Signed ``/media/{id}/...`` links, valid ``LINK_TTL_S``: what a player element can fetch."""

    media: str
    audio: str
    subtitles: str


class Timeline(msgspec.Struct, frozen=True, omit_defaults=True):
    """``GET /v1/jobs/{id}/timeline``. Spans are ``[start, end]`` source seconds, sorted, disjoint."""

    duration: float
    language: str | None
    #: Guessed from the upload's name ("" when unknown): whether a player may play it.
    media_type: str
    cues: list[Cue]
    #: Where the VAD heard speech.
    speech: list[list[float]]
    #: Where words landed: word timings when the job has them, else its cues' spans; spans
    #: closer than ``WORD_GAP_S`` joined.
    words: list[list[float]]
    links: Links
    #: VAD speech that produced no words; absent only for a transcript written before it existed
    #: (a client may then take ``speech`` minus ``words``, as the job page does).
    unheard: list[list[float]] | msgspec.UnsetType = msgspec.UNSET


async def timeline(request: web.Request) -> web.Response:
    """What the job page shows beside the player, in one answer (``Timeline``)."""
    record = await owned(request)
    key = state(request).tokens.link_key(record.owner)
    try:
        doc = msgspec.json.decode(await review_doc(request, record))
    except msgspec.DecodeError as exc:
        raise errors.JobError(f"job {record.id}: its stored transcript is unreadable: {exc}") from None
    segments = doc.get("segments") or []
    cues = [
        Cue(round(s["start"], 3), round(s["end"], 3), " ".join(s["text"].split()))
        for s in segments
        if s.get("text", "").strip()
    ]
    words = [(w["start"], w["end"]) for s in segments for w in (s.get("words") or [])]
    body = Timeline(
        duration=doc.get("duration", record.duration),
        language=doc.get("language"),
        media_type=mimetypes.guess_type(record.input_name or "")[0] or "",
        cues=cues,
        speech=merged(doc.get("speech") or []),
        words=merged(words or [(c.start, c.end) for c in cues], WORD_GAP_S),
        links=Links(
            media=signed_link(key, record.id, "media"),
            audio=signed_link(key, record.id, "audio.wav"),
            subtitles=signed_link(key, record.id, "subtitles.vtt"),
        ),
        unheard=merged(doc["unheard"]) if "unheard" in doc else msgspec.UNSET,
    )
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/jobs/{id}/media", media)
    app.router.add_get("/v1/jobs/{id}/audio.wav", audio_wav)
    app.router.add_get("/v1/jobs/{id}/timeline", timeline)
    app.router.add_get("/media/{id}/{name:media|audio\\.wav|subtitles\\.vtt}", linked)
