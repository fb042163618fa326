"""The web process: app factory, error and auth middlewares, and ``vtp web``.

This module only composes: what the handlers share (``WebState``, ``state()``, ``error_response``,
``WebLimits``) lives in ``app.web.state``, so no handler imports the server.

Safe by default: without ``VTP_API_TOKENS`` it binds loopback only and says so, and answers
only to loopback Host names (DNS rebinding); a public address without tokens needs
``--insecure``. State-changing requests from another site's page are refused in every mode
(``app.web.origins``). Redis being away answers 503 with ``Retry-After`` within about a
second, never a hang; every error is JSON ``{"error": {"message", "type"}}`` with a one-line
message (the shape OpenAI clients read).

Bounded: the process holds at most ``WebLimits.redis_connections`` Redis connections (a
request waits up to two seconds for one, then 503), at most ``max_streams`` progress streams
(503 beyond), and every read of a request body gives up with 408 after ``idle_s`` without a
byte (``app.web.uploads``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import time
from functools import partial
from pathlib import Path

import anyio
from aiohttp import web

from app import errors
from app.config import Settings
from app.jobs import JobStore
from app.redis_outage import redis_location
from app.netguard import Guard
from app.storage import open_storage
from app.web import api, media, metrics, openai, origins, pages
from app.web.auth import Tokens, Unauthorized
from app.web.state import (
    OWNER,
    REDIS_OUTAGE_S,
    RETRY_AFTER_S,
    STATE,
    Busy,
    WebLimits,
    WebState,
    error_response,
    state,
)
from app.web.uploads import Spool, UploadStalled, default_probe_limit

log = logging.getLogger("vtp.web")

#: The HTTP status of each kind of error (first match wins).
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (Unauthorized, 401),
    (origins.CrossOrigin, 403),
    (origins.MisdirectedHost, 421),
    (Busy, 503),
    (UploadStalled, 408),
    (errors.MediaTooLarge, 413),
    (errors.MediaTooLong, 413),
    (errors.EmptyMedia, 400),
    (errors.InputNotFound, 400),
    (errors.InputError, 415),
    (errors.OptionsError, 400),
    (errors.JobNotFound, 404),
    (errors.JobError, 409),
    (errors.QueueError, 503),
    (errors.StorageError, 503),
)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    st = state(request)
    try:
        response = await handler(request)
    except errors.VtpError as exc:
        status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="vtp"'}
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc)
        response = error_response(status, str(exc), type(exc).__name__, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/v1/"):
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        response = error_response(exc.status, exc.reason, "HTTPError", headers=kept)
    except Exception:  # a bug: logged with its traceback, answered in one line
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(500, "internal error (logged by the server)", "InternalError")
    key = (request.method, route, response.status)
    st.requests[key] = st.requests.get(key, 0) + 1
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    if request.path.startswith("/v1/") or request.path == "/metrics":
        request[OWNER] = state(request).tokens.owner(request)
    return await handler(request)


@web.middleware
async def headers_middleware(request: web.Request, handler):
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if response.content_type == "text/html":
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:"
        )
    return response


async def _start(app: web.Application) -> None:
    from workers.runtime import enqueue  # the light client: no stage, no speech stack

    st = app[STATE]
    st.redis = enqueue.client(
        st.settings, socket_timeout=st.limits.redis_socket_s, max_connections=st.limits.redis_connections
    )
    st.store = JobStore(
        st.redis, result_ttl=st.settings.result_ttl, where=redis_location(st.settings.redis_url), outage_s=REDIS_OUTAGE_S
    )
    st.enqueue = partial(enqueue.enqueue_first_stage, st.redis, settings=st.settings, outage_s=REDIS_OUTAGE_S)
    st.enqueue_webhook = partial(enqueue.enqueue_webhook, st.redis, settings=st.settings, outage_s=REDIS_OUTAGE_S)


async def _stop(app: web.Application) -> None:
    st = app[STATE]
    if st.redis is not None:
        await st.redis.aclose()


async def healthz(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 (with Retry-After) when it does not."""
    st = state(request)
    try:
        with anyio.fail_after(REDIS_OUTAGE_S + 1):
            await st.store.ping()
    except (errors.QueueError, TimeoutError) as exc:
        return error_response(503, f"Redis unreachable: {exc}", "QueueError", headers={"Retry-After": str(RETRY_AFTER_S)})
    return web.json_response({"status": "ok", "uptime_s": round(time.time() - st.started, 1)})


def create_app(
    settings: Settings, *, spool_dir: Path | None = None, limits: WebLimits | None = None, any_host: bool = False
) -> web.Application:
    """The web app. Without tokens it answers only to loopback Host names unless ``any_host``
    (``vtp web --insecure``)."""
    if settings.webhook_secret:
        from app.webhooks import secret_key

        secret_key(settings.webhook_secret)  # a malformed secret stops start-up, not the first webhook
    # The multipart reader streams; this bounds only what a handler reads whole (JSON bodies).
    loopback_only = not settings.token_list and not any_host
    app = web.Application(
        middlewares=[headers_middleware, errors_middleware, origins.middleware(loopback_only=loopback_only), auth_middleware],
        client_max_size=1 << 20,
    )
    app[STATE] = WebState(
        settings=settings,
        tokens=Tokens(settings.token_list),
        guard=Guard(settings.private_allowlist),
        storage=open_storage(settings.storage_url),
        spool=Spool(spool_dir),
        probe_limit=anyio.Semaphore(default_probe_limit()),
        limits=limits or WebLimits(),
    )
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics.handle)
    api.add_routes(app)
    media.add_routes(app)
    openai.add_routes(app)
    pages.add_routes(app)
    return app


# -- vtp web ----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, settings: Settings, insecure: bool) -> str:
    """The line to print about who may reach the server; ``OptionsError`` if unsafe."""
    if settings.token_list:
        return f"bearer tokens required ({len(settings.token_list)} configured in VTP_API_TOKENS)"
    if is_loopback(host):
        return "no VTP_API_TOKENS: serving loopback only, anyone on this machine may submit"
    if not insecure:
        raise errors.OptionsError(
            f"refusing to serve {host} without VTP_API_TOKENS: set tokens, bind 127.0.0.1, or pass --insecure"
        )
    return f"INSECURE: no VTP_API_TOKENS and serving {host}: anyone who can reach it may submit jobs"


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    port = args.port if args.port is not None else settings.port
    note = check_binding(args.host, settings, args.insecure)
    # --insecure on a public address serves any name; on loopback the rebinding check stays
    app = create_app(settings, any_host=bool(args.insecure) and not is_loopback(args.host))
    logging.getLogger("vtp").setLevel(logging.INFO)
    print(f"vtp web: http://{args.host}:{port}/ ({note})", file=sys.stderr, flush=True)
    web.run_app(app, host=args.host, port=port, print=None, access_log=None, handle_signals=True)
    return 0
