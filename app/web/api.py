"""The jobs API: JSON in and out (msgspec), every job scoped to the token that created it.

    POST   /v1/jobs                          multipart ``file`` (+ form fields) or JSON {"url": ...} -> 202
    GET    /v1/jobs                          own jobs, newest first: ?limit=20&offset=0 -> {"jobs", "next_offset"}
    GET    /v1/jobs/{id}                     status, progress, timings, x realtime, error, webhook attempts
    DELETE /v1/jobs/{id}                     cancel a running job (200); delete a finished one (204)
    GET    /v1/jobs/{id}/transcript.{fmt}    txt, srt, vtt or json, once done
    GET    /v1/jobs/{id}/events              progress as Server-Sent Events, ending with the final state

What a client may choose: ``language`` (a code of ``app.languages``; unknown: 400), ``task``
(``transcribe`` or ``translate``: English text; 400 on an English-only model),
``language_per_chunk``, ``formats``, ``word_timestamps``, ``model`` (one of ``VTP_MODELS``),
``webhook_url``, ``idempotency_key`` (or the ``Idempotency-Key`` header).
Never a model path, a device or a compute type: those belong to the workers' settings.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from app import dag, errors, keys
from app.formats import MEDIA_TYPES
from app.media import safe_basename
from app.messages import ALL_FORMATS, JobRecord, JobView, TranscribeOptions, options_from
from app.submit import Submitted, submit_file
from app.web.state import OWNER, Busy, WebState, state
from app.web.uploads import Upload, check_media, read_body, receive_multipart, receive_url

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: What a client may set; anything else (device, compute_type, a path...) is refused with 400.
CLIENT_FIELDS = frozenset(
    {"language", "task", "language_per_chunk", "formats", "word_timestamps", "model", "webhook_url", "idempotency_key"}
)
MAX_PAGE = 100


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The JSON body of ``POST /v1/jobs``."""

    url: str
    language: str | None = None
    task: str | None = None
    language_per_chunk: bool = False
    formats: list[str] | str | None = None
    word_timestamps: bool = False
    model: str | None = None
    webhook_url: str | None = None
    idempotency_key: str | None = None


def encode_json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), status=status, content_type="application/json", headers=headers)


def client_options(
    st: WebState, *, model: str | None, language: str | None, formats, word_timestamps: bool,
    task: str | None = None, language_per_chunk: bool = False,
) -> TranscribeOptions:
    """Options from what a client sent, within what the server allows."""
    allowed = st.settings.model_list
    if model in (None, "", "whisper-1", "default"):  # whisper-1: what OpenAI clients send by default
        model = allowed[0]
    if model not in allowed:
        raise errors.OptionsError(f"model {model!r} is not offered here; choose from {', '.join(allowed)}")
    if isinstance(formats, str):
        formats = [f.strip().lower() for f in formats.split(",") if f.strip()]
    if formats:
        bad = [f for f in formats if f not in ALL_FORMATS]
        if bad:
            raise errors.OptionsError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(ALL_FORMATS)}")
        formats = list(dict.fromkeys(formats))
    return options_from(
        {
            "model": model,
            "language": (language or "").strip().lower() or None,
            "task": (task or "").strip().lower() or None,
            "language_per_chunk": language_per_chunk,
            "formats": formats or None,
            "word_timestamps": word_timestamps,
            "batch_size": st.settings.batch_size,  # the fan-out unit: the server's, not the client's
        }
    )


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


async def check_webhook_url(st: WebState, url: str | None) -> str:
    if not url:
        return ""
    if not st.settings.webhook_secret:
        raise errors.OptionsError("webhooks are off on this server (no VTP_WEBHOOK_SECRET)")
    await st.guard.check_resolves(url, "webhook_url")
    return url


async def accept(
    st: WebState, owner: str, upload: Upload, options: TranscribeOptions, *, idempotency_key: str = "", webhook_url: str = ""
) -> Submitted:
    """Check the media (415/413), then create and enqueue the job (``app.submit``).

    The same media with the same options joins the owner's job that is queued, running or
    done, unless the request names itself: with an idempotency key the key alone decides (a
    client that sends two keys asks for two jobs), and with a webhook the job must be its own."""
    st.upload_bytes += upload.size
    if idempotency_key:  # a retried request returns its job before any probing
        earlier = await st.store.find_by_key(owner, idempotency_key)
        if earlier is not None:
            return Submitted(earlier, "idempotent")
    await check_media(upload, max_duration=st.settings.max_duration, limiter=st.probe_limit)
    return await submit_file(
        st.store, st.storage, st.enqueue, upload.path, options,
        basename=safe_basename(upload.name), owner=owner, idempotency_key=idempotency_key,
        max_bytes=st.settings.max_upload_bytes, reuse=not webhook_url and not idempotency_key, input_name=upload.name,
        webhook_url=webhook_url, sha256=upload.sha256,
    )


async def create_job(request: web.Request) -> web.Response:
    st = state(request)
    owner = request[OWNER]
    await st.store.ping()  # Redis away: 503 now, before the upload is read
    header_key = request.headers.get("Idempotency-Key", "")
    async with st.spool.file() as path:
        if request.content_type == "application/json":
            try:
                body = msgspec.json.decode(await read_body(request, idle_s=st.limits.idle_s), type=JobRequest)
            except msgspec.ValidationError as exc:
                raise errors.OptionsError(f"invalid request: {exc}") from None
            except msgspec.DecodeError as exc:
                raise errors.OptionsError(f"invalid JSON: {exc}") from None
            options = client_options(
                st, model=body.model, language=body.language, formats=body.formats, word_timestamps=body.word_timestamps,
                task=body.task, language_per_chunk=body.language_per_chunk,
            )
            webhook_url = await check_webhook_url(st, body.webhook_url)
            upload = await receive_url(st.guard, body.url, path, max_bytes=st.settings.max_upload_bytes)
            key = body.idempotency_key or header_key
        elif request.content_type.startswith("multipart/"):
            upload = await receive_multipart(request, path, max_bytes=st.settings.max_upload_bytes, idle_s=st.limits.idle_s)
            unknown = sorted(set(upload.fields) - CLIENT_FIELDS)
            if unknown:
                raise errors.OptionsError(
                    f"unknown field(s) {', '.join(unknown)}; a client may set {', '.join(sorted(CLIENT_FIELDS))}"
                )
            options = client_options(
                st, model=upload.field("model"), language=upload.field("language"),
                formats=upload.field("formats"), word_timestamps=_flag(upload.field("word_timestamps")),
                task=upload.field("task"), language_per_chunk=_flag(upload.field("language_per_chunk")),
            )
            webhook_url = await check_webhook_url(st, upload.field("webhook_url"))
            key = upload.field("idempotency_key") or header_key
        else:
            raise web.HTTPUnsupportedMediaType(reason="send multipart/form-data (field 'file') or application/json {\"url\": ...}")
        if len(key) > 200:
            raise errors.OptionsError("idempotency_key is longer than 200 characters")
        sub = await accept(st, owner, upload, options, idempotency_key=key, webhook_url=webhook_url)
    view = JobView.of(sub.record)
    return encode_json(view, status=202 if sub.how == "new" else 200, headers={"Location": f"/v1/jobs/{sub.record.id}"})


async def owned(request: web.Request) -> JobRecord:
    """The job named in the path, if the caller owns it; 404 otherwise, whoever owns it."""
    job_id = request.match_info["id"]
    record = await state(request).store.find(job_id) if _JOB_ID.match(job_id) else None
    if record is None or record.owner != request[OWNER]:
        raise errors.JobNotFound(f"no job {job_id!r}")
    return record


async def get_job(request: web.Request) -> web.Response:
    return encode_json(JobView.of(await owned(request)))


async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = min(max(int(request.query.get("limit", "20")), 1), MAX_PAGE)
        offset = max(int(request.query.get("offset", "0")), 0)
    except ValueError:
        raise errors.OptionsError("limit and offset must be integers") from None
    records, next_offset = await state(request).store.list_owned(request[OWNER], offset=offset, limit=limit)
    return encode_json({"jobs": [JobView.of(r) for r in records], "next_offset": next_offset})


async def delete_job(request: web.Request) -> web.Response:
    st = state(request)
    record = await owned(request)
    if not record.terminal:
        try:
            cancelled = await st.store.cancel(record.id)
        except errors.JobError:  # it ended meanwhile: report it as it is now
            return encode_json(JobView.of(await owned(request)))
        if cancelled.webhook_url:
            await st.enqueue_webhook(cancelled.id)
        return encode_json(JobView.of(cancelled))
    await st.storage.delete_prefix(keys.job_prefix(record.id))
    await st.store.delete(record)
    return web.Response(status=204)


async def transcript(request: web.Request) -> web.Response:
    st = state(request)
    record = await owned(request)
    fmt = request.match_info["fmt"]
    if record.state != dag.DONE:
        raise errors.JobError(f"job {record.id} is {record.state}, not done" + (f": {record.error}" if record.error else ""))
    key = record.outputs.get(fmt)
    if key is None:
        raise errors.JobNotFound(f"job {record.id} has no {fmt} output (it was asked for {', '.join(sorted(record.outputs))})")
    data = await st.storage.get_bytes(key)
    disposition = "inline" if request.query.get("inline") else f'attachment; filename="{record.basename}.{fmt}"'
    return web.Response(body=data, headers={"Content-Type": MEDIA_TYPES[fmt], "Content-Disposition": disposition})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: one ``data: <ProgressEvent JSON>`` per change, the last one final;
    a ``: keep-alive`` comment whenever ``stream_poll_s`` passes without one. At most
    ``max_streams`` at once (each holds a Redis connection in a blocking read): 503 beyond."""
    st = state(request)
    record = await owned(request)
    limits = st.limits
    if st.streams >= limits.max_streams:
        raise Busy(f"{limits.max_streams} progress streams are open; try again shortly")
    st.streams += 1
    try:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        await resp.write(b": " + record.state.encode() + b"\n\n")
        try:
            async for event in st.store.events(
                record.id, poll_s=limits.stream_poll_s, reconnect_s=limits.stream_reconnect_s, idle=True
            ):
                if event is None:
                    await resp.write(b": keep-alive\n\n")
                else:
                    await resp.write(b"event: progress\ndata: " + msgspec.json.encode(event) + b"\n\n")
        except errors.VtpError as exc:
            await resp.write(b"event: error\ndata: " + msgspec.json.encode({"message": str(exc)}) + b"\n\n")
        except ConnectionResetError:  # the browser went away
            pass
        return resp
    finally:
        st.streams -= 1


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", create_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", delete_job)
    app.router.add_get("/v1/jobs/{id}/transcript.{fmt:txt|srt|vtt|json}", transcript)
    app.router.add_get("/v1/jobs/{id}/events", events)
