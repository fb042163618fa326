"""Who may talk to the web process from a browser: the Host and Origin checks.

Two attacks need no token when a browser is the weapon:

* **DNS rebinding.** A page on ``attacker.example`` makes its name resolve to 127.0.0.1; the
  browser then treats ``http://attacker.example:8000`` as the attacker's own origin and lets its
  script read what the server on loopback answers. The request still says
  ``Host: attacker.example``. So without ``VTP_API_TOKENS`` (the loopback-only mode) only
  loopback Host names are served: ``localhost``, ``127.x.x.x`` and ``[::1]``, any port (and a
  request with no Host at all, which no browser sends). Anything else gets 421 Misdirected
  Request. ``vtp web --insecure`` on a public address (tokenless, anyone may submit anyway)
  turns this off.
* **Cross-site request forgery.** Any page can make a browser POST a multipart form to any
  address. Every state-changing request (POST, PUT, PATCH, DELETE), in every mode, is refused
  with 403 when its ``Origin`` is another site's (or ``null``, a sandboxed or file page) or
  ``Sec-Fetch-Site`` says ``cross-site``. Browsers send ``Origin`` on every such request;
  clients that are not browsers (curl, the ``openai`` SDK, ``vtp submit``) send none and are
  not affected. Same origin means the same host and port as the request's ``Host`` (the
  scheme is not compared: a TLS proxy in front speaks plain HTTP to this process, and must
  pass ``Host`` through unchanged).

With tokens, nothing is ambient: the pages keep the token in the browser's localStorage (per
origin, so another site cannot read it) and send it as ``Authorization: Bearer`` on each
call. No cookie is ever set, so a request another site makes carries no credentials at all.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from app import errors

#: Methods that change something; GET and HEAD never do.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class MisdirectedHost(errors.VtpError):
    """A Host name the tokenless server does not serve (421)."""

    permanent = True


class CrossOrigin(errors.VtpError):
    """A state-changing request another site's page made (403)."""

    permanent = True


def split_host(value: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6]:port`` too) -> (host without brackets, lower case, no trailing dot; port or '')."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host.rstrip("."), port


def is_loopback_name(host: str) -> bool:
    """``localhost`` or a loopback address literal (as a Host header spells it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _site(host: str, port: str) -> tuple[str, str]:
    """(host, port) with a default port (80, 443) left out, so ``x:443`` and ``x`` agree."""
    return host, "" if port in ("80", "443") else port


def check_host(request: web.Request) -> None:
    host = request.headers.get("Host")
    if host is None:
        return
    name, _ = split_host(host)
    if not is_loopback_name(name):
        raise MisdirectedHost(
            f"this server has no VTP_API_TOKENS and answers only to loopback names (localhost, 127.0.0.1, [::1]),"
            f" not {host!r}: set VTP_API_TOKENS to serve other names"
        )


def check_origin(request: web.Request) -> None:
    if request.method not in UNSAFE_METHODS:
        return
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        raise CrossOrigin("refused: a cross-site request (Sec-Fetch-Site: cross-site) may not change anything here")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    parts = urlsplit(origin.strip())
    if origin.strip().lower() == "null" or not parts.hostname:
        raise CrossOrigin(f"refused: a request from origin {origin!r} may not change anything here")
    theirs = _site(*split_host(parts.netloc))
    ours = _site(*split_host(request.headers.get("Host", "")))
    if theirs != ours:
        raise CrossOrigin(f"refused: a page of {origin} may not change anything on this server (a cross-site request)")


def middleware(*, loopback_only: bool):
    """The aiohttp middleware: Host check when ``loopback_only``, Origin check always."""

    @web.middleware
    async def origins_middleware(request: web.Request, handler):
        if loopback_only:
            check_host(request)
        check_origin(request)
        return await handler(request)

    return origins_middleware
