"""``Retry-After`` (RFC 9110 §10.2.3): how long a server asked a client to wait, for every
HTTP client vtp runs — webhook delivery (``app.webhooks``) and the Fly Machines API client
(``workers.controller.fly``).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds the header asks for: delta-seconds or an HTTP date; None when absent or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None
