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
"""

from __future__ import annotations

import anyio
import msgspec
from aiohttp import web

from app import errors
from app.web import api
from app.web.server import error_response, state
from app.web.uploads import receive_multipart

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
IGNORED = frozenset({"prompt", "temperature", "stream", "chunking_strategy", "include[]"})
#: Longest a request waits for its job (a client that gives up first just disconnects; the job runs on).
WAIT_S = 3600.0


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
    owner = request["owner"]
    await st.store.ping()
    if not request.content_type.startswith("multipart/"):
        raise errors.OptionsError("send multipart/form-data with the audio as 'file'")
    async with st.spool.file() as path:
        upload = await receive_multipart(request, path, max_bytes=st.settings.max_upload_bytes)
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
    record = sub.record
    if not record.terminal:
        try:
            with anyio.fail_after(WAIT_S):
                record = await st.store.wait(record.id)
        except TimeoutError:
            msg = f"job {record.id} is still running; follow it at /v1/jobs/{record.id}"
            return error_response(504, msg, "Timeout", headers={"Location": f"/v1/jobs/{record.id}"})
    if record.state != "done":
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
