"""The SSRF guard: outgoing HTTP (URL ingest, webhooks) reaches public addresses only.

Loopback, private (RFC 1918, unique-local), link-local (which holds the cloud metadata
endpoints, 169.254.169.254 and fd00:ec2::254), shared (100.64/10), multicast, unspecified
and reserved addresses are refused unless a CIDR of ``VTP_PRIVATE_ALLOWLIST`` holds them.

Three holes this closes, each a classic:

* **Literal IPs in odd spellings.** ``127.1``, ``2130706433``, ``0x7f.1`` and ``0177.0.0.1``
  are all 127.0.0.1 to the C library; aiohttp treats them as IP literals and *skips the
  resolver* for them, so they are parsed here the way ``inet_aton`` does and checked before
  any request. IPv6 forms that embed an IPv4 address (``::ffff:127.0.0.1``, 6to4 ``2002::/16``,
  NAT64 ``64:ff9b::/96``) are checked as the IPv4 address they carry.
* **Names that resolve to private addresses.** Every name goes through ``GuardedResolver``,
  which resolves it once and refuses the whole answer if *any* address is refused.
* **DNS rebinding.** The connector connects to the addresses that resolver returned and
  checked — the name is never resolved a second time — with a fresh connector (no cache)
  per request session. Redirects are not followed automatically: each hop is checked anew
  (``fetch``), and webhooks follow none.

Proxies from the environment are ignored (``trust_env=False``): a proxy would connect
wherever it liked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Union

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from app import errors

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Redirect hops URL ingest follows (each one checked).
MAX_REDIRECTS = 5


def parse_allowlist(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in value.split(","):
        if item.strip():
            try:
                nets.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise errors.OptionsError(f"VTP_PRIVATE_ALLOWLIST: {item.strip()!r} is not a CIDR") from None
    return tuple(nets)


def literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one in any spelling the C library accepts."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if "%" in host:  # an IPv6 zone index
        try:
            return ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
    try:  # 127.1, 2130706433, 0x7f.1, 0177.0.0.1: what inet_aton (and so connect) accepts
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


class Guard:
    """Which addresses outgoing requests may reach."""

    def __init__(self, allowlist: str = "") -> None:
        self.allowlist = parse_allowlist(allowlist)

    def allowed(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        inner = embedded_ipv4(ip)
        if any(addr.version == net.version and addr in net for net in self.allowlist for addr in (ip, inner)):
            return True
        return inner.is_global and not (inner.is_multicast or inner.is_unspecified or inner.is_reserved)

    def check_ip(self, ip: IPAddress, what: str) -> None:
        if not self.allowed(ip):
            raise errors.Forbidden(
                f"{what}: {embedded_ipv4(ip)} is a loopback, private, link-local or metadata address "
                "(refused unless VTP_PRIVATE_ALLOWLIST holds it)"
            )

    def check_url(self, url: str | URL, what: str = "URL") -> URL:
        """Syntax, scheme and (for IP literals) the address; names are checked when resolved."""
        try:
            u = URL(url) if isinstance(url, str) else url
        except (ValueError, TypeError):
            raise errors.OptionsError(f"{what}: not a URL") from None
        if u.scheme not in ("http", "https") or not u.raw_host:
            raise errors.OptionsError(f"{what}: only http:// and https:// URLs with a host are accepted")
        if len(str(u)) > 2048:
            raise errors.OptionsError(f"{what}: longer than 2048 characters")
        ip = literal_ip(u.raw_host)
        if ip is not None:
            self.check_ip(ip, what)
        return u

    async def check_resolves(self, url: str | URL, what: str = "URL") -> URL:
        """``check_url`` plus a DNS lookup now: a name that answers with a refused address
        is refused at submit time rather than when the webhook fires."""
        u = self.check_url(url, what)
        if literal_ip(u.raw_host) is None:
            await GuardedResolver(self, what).resolve(u.raw_host, u.port or 0, socket.AF_UNSPEC)
        return u

    @asynccontextmanager
    async def session(self, *, timeout: float, what: str = "URL") -> AsyncIterator[aiohttp.ClientSession]:
        """A client session whose connections can only reach checked addresses."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self, what), use_dns_cache=False, limit=4)
        async with aiohttp.ClientSession(
            connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session:
            yield session


class GuardedResolver(ThreadedResolver):
    """Resolves once, refuses the answer if any address is refused, and hands the connector
    exactly the checked addresses (so it cannot be rebound to another between check and use)."""

    def __init__(self, guard: Guard, what: str) -> None:
        super().__init__()
        self.guard = guard
        self.what = what

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            results = await super().resolve(host, port, family)
        except OSError as exc:
            raise errors.Forbidden(f"{self.what}: cannot resolve {host!r}: {exc}") from None
        if not results:
            raise errors.Forbidden(f"{self.what}: {host!r} has no address")
        for r in results:
            ip = literal_ip(r["host"])
            if ip is None:
                raise errors.Forbidden(f"{self.what}: {host!r} resolved to {r['host']!r}, not an address")
            self.guard.check_ip(ip, f"{self.what} ({host} -> {ip})")
        return results


@asynccontextmanager
async def fetch(guard: Guard, url: str, *, timeout: float, what: str = "URL") -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url`` through the guard, following up to ``MAX_REDIRECTS`` redirects, each hop
    checked like the first; the final response is yielded unread (stream its body)."""
    current = guard.check_url(url, what)
    async with guard.session(timeout=timeout, what=what) as session:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await session.get(current, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, errors.VtpError):  # the resolver refused it
                    raise cause from None
                raise errors.InputNotFound(f"{what}: cannot download {current.human_repr()}: {exc or type(exc).__name__}") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                location = current.join(URL(resp.headers["Location"]))
                resp.release()
                current = guard.check_url(location, what)
                continue
            try:
                yield resp
            finally:
                resp.release()
            return
        raise errors.InputNotFound(f"{what}: more than {MAX_REDIRECTS} redirects")
