"""Bearer tokens -> the owner of a job.

``VTP_API_TOKENS`` is a comma list of tokens; a request must carry one as
``Authorization: Bearer <token>``. Each token owns the jobs it created: its owner id is a hash
of the token (the token itself is never stored), and a job of another owner is answered 404,
exactly like a job that does not exist, so ids cannot be probed.

With no tokens configured every request is the anonymous owner ``""`` — acceptable only
because ``vtp web`` then binds loopback alone (or a public address with an explicit
``--insecure``).
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from app import errors


class Unauthorized(errors.VtpError):
    """No valid bearer token (401)."""

    permanent = True


def owner_id(token: str) -> str:
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:24]


class Tokens:
    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._owners = {t.encode(): owner_id(t) for t in tokens}
        self._secrets = {owner: hashlib.sha256(b"vtp media link\0" + t).digest() for t, owner in self._owners.items()}

    def link_key(self, owner: str) -> bytes:
        """The key that signs ``owner``'s media links (``app.web.media``): derived from the
        owner's token, so every web process holding the same tokens checks the same links, and a
        link stops working when its token is removed. The anonymous owner (no tokens) gets a
        fixed key: without tokens the whole API is open to whoever can reach it anyway."""
        if not self._owners:
            return hashlib.sha256(b"vtp media link\0").digest()
        return self._secrets.get(owner, b"")

    @property
    def enabled(self) -> bool:
        return bool(self._owners)

    def owner(self, request: web.Request) -> str:
        """The owner the request acts as; ``Unauthorized`` without a valid token."""
        if not self._owners:
            return ""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send Authorization: Bearer <token>")
        given = token.strip().encode()
        found = ""
        for known, owner in self._owners.items():  # compare with every token, in constant time
            if hmac.compare_digest(known, given):
                found = owner
        if not found:
            raise Unauthorized("invalid bearer token")
        return found
