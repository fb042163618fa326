"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``, the OpenAI-compatible
endpoints: what the ``openai`` clients (and everything built on them) send, answered once the
job is done. A translation is a job with ``task=translate``: English text, whatever the language
spoken (no ``language`` field, as OpenAI's; an English-only model answers 400).

Form fields: ``file``; ``model`` (``whisper-1``, what the clients send by default, means the
server's default model; otherwise one of ``VTP_MODELS``); ``language``; ``response_format``
``json`` (default) | ``text`` | ``srt`` | ``vtt`` | ``verbose_json``;
``timestamp_granularities[]`` ``segment`` and/or ``word`` (words need ``verbose_json``).
``prompt`` and ``temperature`` are accepted and ignored. The job is an ordinary job of the
caller's token: it shows up in ``GET /v1/jobs`` too.

No work is repeated: the request is keyed by its media's sha256 and its options, so a retry
(the official SDK retries twice after its timeout) or an identical request joins the job that
is queued, running or done instead of starting another (``app.submit``). A request whose
client has gone away stops waiting within ``WebLimits.openai_poll_s``; the job runs on, and a
retry joins it. A waiting request holds no Redis connection: it reads the job's record once
per ``openai_poll_s``. It waits at most ``openai_wait_s`` (then 504 with the job's URL).
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from aiohttp import web

from app import dag, errors
from app.messages import JobRecord
from app.web import api
from app.web.state import OWNER, WebState, error_response, state
from app.web.uploads import receive_multipart

log = logging.getLogger("vtp.web")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
IGNORED = frozenset({"prompt", "temperature", "stream", "chunking_strategy", "include[]"})


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def wait_for(request: web.Request, st: WebState, record: JobRecord) -> JobRecord | None:
    """The job's record once it has ended; None as soon as the client has gone away;
    ``TimeoutError`` after ``openai_wait_s``."""
    limits = st.limits
    deadline = time.monotonic() + limits.openai_wait_s
    st.openai_waiting += 1
    try:
        while not record.terminal:
            if client_gone(request):
                log.info("job %s: the OpenAI client went away; stopped waiting (the job runs on)", record.id)
                return None
            if time.monotonic() >= deadline:
                raise TimeoutError
            await anyio.sleep(limits.openai_poll_s)
            record = await st.store.get(record.id)
        return record
    finally:
        st.openai_waiting -= 1


def _segments(doc: dict) -> list[dict]:
    out = []
    for i, s in enumerate(doc.get("segments", [])):
        out.append(
            {
                "id": i,
                "seek": 0,
                "start": s["start"],
                "end": s["end"],
                "text": s["text"],
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": s.get("avg_logprob", 0.0),
                "compression_ratio": 0.0,
                "no_speech_prob": s.get("no_speech_prob", 0.0),
            }
        )
    return out


async def transcriptions(request: web.Request) -> web.Response:
    return await _answer(request, "transcribe")


async def translations(request: web.Request) -> web.Response:
    return await _answer(request, "translate")


async def _answer(request: web.Request, task: str) -> web.Response:
    st = state(request)
    owner = request[OWNER]
    await st.store.ping()
    if not request.content_type.startswith("multipart/"):
        raise errors.OptionsError("send multipart/form-data with the audio as 'file'")
    async with st.spool.file() as path:
        upload = await receive_multipart(request, path, max_bytes=st.settings.max_upload_bytes, idle_s=st.limits.idle_s)
        fmt = (upload.field("response_format") or "json").strip().lower()
        if fmt not in RESPONSE_FORMATS:
            raise errors.OptionsError(f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}")
        granularities = set(upload.fields.get("timestamp_granularities[]", []) + upload.fields.get("timestamp_granularities", []))
        if granularities - {"segment", "word"}:
            raise errors.OptionsError("timestamp_granularities may be segment and/or word")
        known = {"model", "response_format", "timestamp_granularities[]", "timestamp_granularities"}
        if task == "transcribe":
            known.add("language")
        unknown = sorted(set(upload.fields) - IGNORED - known)
        if unknown:
            raise errors.OptionsError(f"unknown field(s) {', '.join(unknown)}")
        options = api.client_options(
            st, model=upload.field("model"), language=upload.field("language"),
            formats=None, word_timestamps="word" in granularities, task=task,
        )
        sub = await api.accept(st, owner, upload, options)
    try:
        record = await wait_for(request, st, sub.record)
    except TimeoutError:
        job_id = sub.record.id
        msg = f"job {job_id} is still running; follow it at /v1/jobs/{job_id}"
        return error_response(504, msg, "Timeout", headers={"Location": f"/v1/jobs/{job_id}"})
    if record is None:  # nobody to answer
        return web.Response(status=499)
    if record.state != dag.DONE:
        # The media was refused by a worker (unreadable, no audio...): the client's fault, 400.
        raise errors.InputError(record.error or f"the job was {record.state}")
    key = {"json": "json", "verbose_json": "json", "text": "txt", "srt": "srt", "vtt": "vtt"}[fmt]
    data = await st.storage.get_bytes(record.outputs[key])
    if fmt in ("text", "srt", "vtt"):
        return web.Response(body=data, content_type="text/plain", charset="utf-8")
    doc = msgspec.json.decode(data)
    text = doc.get("text", "")
    if fmt == "json":
        return api.encode_json({"text": text, "usage": {"type": "duration", "seconds": round(doc.get("duration", 0.0))}})
    body = {
        "task": doc.get("task", task),
        "language": doc.get("language", ""),
        "duration": doc.get("duration", 0.0),
        "text": text,
        "segments": _segments(doc),
    }
    if "word" in granularities:
        body["words"] = [
            {"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
            for s in doc.get("segments", [])
            for w in s.get("words") or []
        ]
    return api.encode_json(body)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)
