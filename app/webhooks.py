"""Webhooks: a signed POST when a job ends, following the Standard Webhooks spec
(https://www.standardwebhooks.com), so receivers verify it with the ``standardwebhooks``
library (or twenty lines of HMAC).

Each delivery carries ``webhook-id`` (``msg_<job id>``: the same on every attempt, so a
receiver can drop duplicates), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` keyed with the
bytes of ``VTP_WEBHOOK_SECRET`` (``whsec_<base64>``). The body is a ``WebhookEvent``:
``{"type": "job.completed" | "job.failed" | "job.cancelled", "timestamp", "data": <the job as
GET /v1/jobs/{id} shows it>}``.

Delivery runs on the CPU workers as its own arq task (``webhook_task`` in ``workers.runtime.tasks``),
never on a GPU worker and never inside a stage: one attempt per task run, each with a 15 s
timeout, through the SSRF guard (``app.netguard``), redirects not followed. A 2xx answer
delivers it; anything else (3xx, 4xx, 5xx, a timeout, a refused connection) is tried again
after an exponential backoff with jitter — or after the receiver's ``Retry-After`` on a 429
or 503 — up to ``VTP_WEBHOOK_TRIES`` attempts. Every attempt is written to the job record
(``JobRecord.webhook``), so ``GET /v1/jobs/{id}`` shows what happened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from datetime import datetime, timezone

import aiohttp
import msgspec

from app import dag, errors
from app.backoff import equal_jitter, exponential
from app.config import Settings
from app.jobs import JobStore
from app.messages import JobRecord, JobView, WebhookAttempt, WebhookDelivery, WebhookEvent
from app.netguard import Guard
from app.retry_after import retry_after_seconds

#: Seconds one attempt may take, connection included.
TIMEOUT_S = 15.0
#: Longest wait between attempts, whatever the backoff or a ``Retry-After`` says.
MAX_DELAY_S = 3600.0
EVENT_TYPES = {dag.DONE: "job.completed", dag.FAILED: "job.failed", dag.CANCELLED: "job.cancelled"}
USER_AGENT = "vtp-webhooks/1"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise errors.OptionsError("VTP_WEBHOOK_SECRET must be whsec_ followed by base64 (e.g. whsec_$(openssl rand -base64 32))")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_body(record: JobRecord) -> bytes:
    """The event of a finished job; the same bytes on every attempt (delivery state left out)."""
    finished = record.finished_at or record.updated_at or time.time()
    event = WebhookEvent(
        type=EVENT_TYPES[record.state],
        timestamp=datetime.fromtimestamp(finished, timezone.utc).isoformat().replace("+00:00", "Z"),
        data=JobView.of(msgspec.structs.replace(record, webhook=None)),
    )
    return msgspec.json.encode(event)


def retry_after(headers) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    return retry_after_seconds(headers.get("Retry-After"))


def backoff(attempt: int, base: float, *, asked: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: what the receiver asked for, else ``base``
    doubling per attempt with "equal jitter" (between half and all of it)."""
    if asked is not None:
        return min(asked, MAX_DELAY_S)
    return equal_jitter(exponential(attempt, base, MAX_DELAY_S))


class Answer(msgspec.Struct, frozen=True):
    #: HTTP status; 0 when nothing answered.
    status: int
    error: str = ""
    #: Seconds the receiver's ``Retry-After`` asked for.
    retry_after: float | None = None
    #: The SSRF guard refused the target: no later attempt can succeed.
    refused: bool = False


async def post_once(guard: Guard, url: str, headers: dict[str, str], body: bytes) -> Answer:
    """One POST, redirects not followed."""
    try:
        guard.check_url(url, "webhook URL")
        async with guard.session(timeout=TIMEOUT_S, what="webhook URL") as session:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(4096)  # a little of the answer; never a whole body
                error = "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                asked = retry_after(resp.headers) if resp.status in (429, 503) else None
                return Answer(resp.status, error, asked)
    except errors.Forbidden as exc:
        return Answer(0, str(exc), refused=True)
    except errors.VtpError as exc:
        return Answer(0, str(exc))
    except TimeoutError:
        return Answer(0, f"no answer within {TIMEOUT_S:g} s")
    except aiohttp.ClientError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, errors.Forbidden):
            return Answer(0, str(cause), refused=True)
        return Answer(0, f"{type(exc).__name__}: {exc}")


async def deliver(store: JobStore, settings: Settings, guard: Guard, job_id: str) -> float | None:
    """Make the next attempt of a finished job's webhook; the seconds until the one after
    (None: nothing more to do — delivered, given up, or no webhook)."""
    record = await store.find(job_id)
    if record is None or not record.terminal or not record.webhook_url:
        return None
    delivery = record.webhook or WebhookDelivery(id=f"msg_{record.id}", event=EVENT_TYPES[record.state])
    if delivery.state != "pending":
        return None
    key = secret_key(settings.webhook_secret)
    body = event_body(record)
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": delivery.id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(key, delivery.id, now, body),
    }
    answer = await post_once(guard, record.webhook_url, headers, body)
    number = len(delivery.attempts) + 1
    if 200 <= answer.status < 300:
        state, wait = "delivered", None
    elif number >= settings.webhook_tries or answer.refused:
        state, wait = "failed", None
    else:
        state, wait = "pending", backoff(number, settings.webhook_retry_delay, asked=answer.retry_after)
    attempt = WebhookAttempt(
        at=round(time.time(), 3), status=answer.status, error=answer.error, retry_in=round(wait or 0.0, 3)
    )
    delivery = WebhookDelivery(id=delivery.id, event=delivery.event, state=state, attempts=[*delivery.attempts, attempt])
    await store.set_webhook(job_id, delivery)
    return wait
