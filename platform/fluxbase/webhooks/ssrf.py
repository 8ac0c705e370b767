"""The SSRF guard: webhook URLs may only reach public addresses.

Checked twice: when an endpoint is configured (a clear VALIDATION_ERROR) and again at every
connect, through `GuardedResolver`, because DNS may answer differently later (rebinding).
Only globally routable unicast addresses pass; loopback passes only when the instance allows it
for local development. Literal IPs never reach a resolver, so `check_literal` covers them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from fluxbase.errors import ValidationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services that some providers place at addresses `is_global` might not cover.
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class ForbiddenTarget(OSError):
    """A webhook target resolved to an address the guard refuses."""


def address_allowed(ip: IPAddress, allow_loopback: bool) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_allowed(mapped, allow_loopback)
    if ip in METADATA:
        return False
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not ip.is_multicast


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
        raise ValidationError("url must not carry credentials; sign requests with the webhook secret.")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_literal(url: str, allow_loopback: bool) -> None:
    """Refuse a URL whose host is a literal address outside the allowed set (no DNS involved)."""
    _, host, _ = parse_url(url)
    ip = _literal(host)
    if ip is not None and not address_allowed(ip, allow_loopback):
        raise ForbiddenTarget(f"{ip} is not a public address")


async def check_url(url: str, allow_loopback: bool) -> None:
    """Configuration-time check: every address the host resolves to must be allowed."""
    _, host, port = parse_url(url)
    ip = _literal(host)
    if ip is not None:
        addresses = [ip]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise ValidationError(f"url host {host!r} does not resolve.") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    refused = sorted({str(a) for a in addresses if not address_allowed(a, allow_loopback)})
    if refused:
        raise ValidationError(
            f"url resolves to {', '.join(refused)}: loopback, private, link-local and metadata "
            "addresses are not allowed as webhook targets."
        )


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops every address the guard refuses, at connect time."""

    def __init__(self, allow_loopback: bool):
        self.allow_loopback = allow_loopback
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [
            r
            for r in results
            if address_allowed(ipaddress.ip_address(r["host"].split("%")[0]), self.allow_loopback)
        ]
        if not allowed:
            raise ForbiddenTarget(f"{host} resolves only to addresses webhooks may not reach")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
