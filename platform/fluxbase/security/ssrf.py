"""The one guard for the platform's outbound HTTP (webhook deliveries, JWKS fetches).

Only globally routable unicast addresses may be reached, plus what the operator's allow-list
(FLUXBASE_OUTBOUND_ALLOW_NETWORKS, for local development) names. The rules are checked on the
resolver's answer at connect time, inside the connection's own resolver (`GuardedResolver`), so
the address checked is the address connected to: a name that answers a public address to one
lookup and a private one to the next (DNS rebinding) gains nothing. A literal address in a URL
never reaches a resolver, so `OutboundClient` checks it before every request. Every request
goes through `OutboundClient`: no redirects, no proxies from the environment, no cookies.
Configuration-time checks (`check_url`) only give an early, clear VALIDATION_ERROR.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from fluxbase.config import Settings
from fluxbase.errors import ValidationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges never reached unless allow-listed, with the reason (IANA's special-purpose registries;
# the first row that matches names the reason). Anything else Python does not call global is
# refused as well. IPv6 forms that embed an IPv4 address are judged by that address first.
REFUSED_NETWORKS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified / this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared address space)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved / broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible IPv6 (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo and others)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique local (private; cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class ForbiddenTarget(OSError):
    """An outbound target resolved to an address the guard refuses."""


@dataclass(frozen=True)
class Policy:
    """The allow-list: networks reachable although the rules above refuse them."""

    allow: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, networks: str | Iterable[str]) -> Policy:
        """From "127.0.0.1/32, ::1/128" (or a list); raises ValueError naming a bad entry."""
        items = networks.split(",") if isinstance(networks, str) else networks
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in items if n.strip()))

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls.parse(settings.outbound.allow_networks)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 (64:ff9b::/96) address leads to."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress, policy: Policy) -> str | None:
    """Why the platform may not connect to `ip`, or None when it may."""
    if any(ip.version == n.version and ip in n for n in policy.allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            why = refusal(inner, policy)
            return None if why is None else f"{why}, embedded in {ip}"
    for net, why in REFUSED_NETWORKS:
        if ip.version == net.version and ip in net:
            return why
    if not ip.is_global or ip.is_multicast:
        return "not globally routable"
    return None


def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone id says nothing here


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, or VALIDATION_ERROR."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ValidationError("url must be an http(s) URL of at most 2048 characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"url is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("url must start with http:// or https:// and name a host.")
    if parts.username or parts.password:
        raise ValidationError("url must not carry credentials.")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> IPAddress | None:
    try:
        return _address(host.strip("[]"))
    except ValueError:
        return None


def check_literal(url: str, policy: Policy) -> None:
    """Refuse a URL whose host is a literal address the guard refuses (no DNS involved)."""
    _, host, _ = parse_url(url)
    ip = _literal(host)
    if ip is not None:
        why = refusal(ip, policy)
        if why is not None:
            raise ForbiddenTarget(f"{ip} is not a public address ({why})")


async def check_url(url: str, policy: Policy, what: str = "url") -> None:
    """Configuration-time check: every address the host resolves to now must be allowed."""
    _, host, port = parse_url(url)
    ip = _literal(host)
    if ip is not None:
        addresses = [ip]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise ValidationError(f"{what} host {host!r} does not resolve.") from None
        addresses = [_address(str(info[4][0])) for info in infos]
    refused = sorted({f"{a} ({why})" for a in addresses if (why := refusal(a, policy)) is not None})
    if refused:
        raise ValidationError(
            f"{what} resolves to {', '.join(refused)}: loopback, private, link-local, carrier-grade "
            "NAT, metadata and other non-public addresses are not allowed."
        )


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops every answer the guard refuses, at each connect."""

    def __init__(self, policy: Policy, inner: AbstractResolver | None = None):
        self.policy = policy
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if refusal(_address(r["host"]), self.policy) is None]
        if not allowed:
            answers = ", ".join(sorted({r["host"] for r in results}))
            raise ForbiddenTarget(f"{host} resolves only to addresses that may not be reached ({answers})")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def forbidden(exc: BaseException) -> ForbiddenTarget | None:
    """The guard's refusal behind an aiohttp connection error, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ForbiddenTarget):
            return seen
        seen = seen.__cause__ or getattr(seen, "os_error", None)
    return None


class OutboundClient:
    """An aiohttp session whose every connection passes the guard; one per process and use."""

    def __init__(self, policy: Policy, *, limit: int = 8):
        self.policy = policy
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy),
                limit=self._limit,
                use_dns_cache=False,  # resolve for every new connection: the guard sees each answer
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # one receiver's cookies never reach another
                trust_env=False,  # no proxy from the environment: the connection is the one checked
                auto_decompress=False,
            )
        return self._session

    @asynccontextmanager
    async def request(
        self, method: str, url: str, *, timeout_s: float, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Raises ForbiddenTarget for a refused target (also when found at connect time)."""
        check_literal(url, self.policy)
        try:
            async with self._client().request(
                method, url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs
            ) as resp:
                yield resp
        except aiohttp.ClientError as exc:
            refused = forbidden(exc)
            if refused is not None:
                raise refused from None
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
