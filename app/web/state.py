"""What the web handlers share: the process's state (``WebState``), its limits, and the error shape.

``app.web.server`` composes the app from the handler modules (api, openai, media, pages, metrics);
they import this module, never the server, so the imports run one way: server -> handlers -> state.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiohttp import web

from app import errors
from app.config import Settings
from app.jobs import JobStore
from app.messages import JobRecord
from app.netguard import Guard
from app.storage import Storage
from app.web.auth import Tokens
from app.web.uploads import IDLE_TIMEOUT_S, Spool

#: Seconds a request waits for an unreachable Redis before answering 503.
REDIS_OUTAGE_S = 1.0
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class WebLimits:
    """The web process's timeouts and bounds (the defaults serve; tests make them short)."""

    #: Seconds one Redis command may take on the socket before it counts as a lost connection.
    redis_socket_s: float = 10.0
    #: Redis connections the process holds at most; a request waits up to 2 s for a free one.
    redis_connections: int = 128
    #: Progress streams (``/v1/jobs/{id}/events``) open at once; one more gets 503.
    max_streams: int = 96
    #: Seconds one blocking read of a progress stream waits for an event. Shorter than
    #: ``redis_socket_s`` (when both were 10 s the read raced the socket timeout and a quiet
    #: stream died with a false "cannot reach Redis"); a stream that got no event in that time
    #: gets a comment line, so proxies and browsers see it alive.
    stream_poll_s: float = 5.0
    #: Seconds a progress stream rides out an unreachable Redis before it reports an error.
    stream_reconnect_s: float = 90.0
    #: Seconds any read of a request body (part headers, a form field, a piece of the file, a
    #: JSON body) may wait for a byte before the request is answered 408.
    idle_s: float = IDLE_TIMEOUT_S
    #: Longest an OpenAI-compatible request waits for its job (then 504 with the job's URL).
    openai_wait_s: float = 3600.0
    #: Seconds between an OpenAI-compatible request's looks at its job and at its client.
    openai_poll_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.stream_poll_s < self.redis_socket_s:
            raise ValueError("stream_poll_s must be positive and shorter than redis_socket_s")
        if not 0 < self.max_streams < self.redis_connections:
            raise ValueError("max_streams must leave Redis connections for other requests")


class Busy(errors.VtpError):
    """A bounded resource of the web process is all taken (503, try again shortly)."""


@dataclass
class WebState:
    settings: Settings
    tokens: Tokens
    guard: Guard
    storage: Storage
    spool: Spool
    probe_limit: anyio.Semaphore
    limits: WebLimits = field(default_factory=WebLimits)
    #: Set at start-up (``_start``), over one Redis client that connects on first use.
    store: JobStore | None = None
    #: ``await enqueue(record)``: queue the first stage (``workers.runtime.enqueue``, imported at start-up).
    enqueue: Callable[[JobRecord], Awaitable[None]] | None = None
    #: ``await enqueue_webhook(job_id)``: queue a finished job's webhook.
    enqueue_webhook: Callable[[str], Awaitable[None]] | None = None
    redis: Any = None
    started: float = field(default_factory=time.time)
    #: counters for /metrics: (method, route, status) -> n; bytes received in uploads.
    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)
    upload_bytes: int = 0
    #: progress streams open now; OpenAI-compatible requests waiting for their job now.
    streams: int = 0
    openai_waiting: int = 0


STATE = web.AppKey("vtp", WebState)
#: The owner a request acts as (``app.web.auth``), set by ``auth_middleware``.
OWNER = web.RequestKey("owner", str)


def state(request: web.Request) -> WebState:
    return request.app[STATE]


def error_response(status: int, message: str, kind: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": " ".join(message.split()), "type": kind}}, status=status, headers=headers
    )
