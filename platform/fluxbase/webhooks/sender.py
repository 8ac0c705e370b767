"""One signed POST to one endpoint: short timeout, no redirects, no cookies, guarded DNS."""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass

import aiohttp

from fluxbase import __version__, tracing
from fluxbase.config import WebhookSettings
from fluxbase.errors import ValidationError
from fluxbase.security import ssrf
from fluxbase.webhooks import signing


@dataclass(frozen=True)
class Attempt:
    ok: bool
    status: int | None
    ms: int
    body: str | None
    error: str | None


class Sender:
    """Deliveries of one process, through the SSRF guard's client (security/ssrf.py)."""

    def __init__(self, settings: WebhookSettings, policy: ssrf.Policy):
        self.settings = settings
        self._http = ssrf.OutboundClient(policy, limit=max(8, settings.concurrency * 2))

    async def close(self) -> None:
        await self._http.close()

    async def send(self, url: str, secret: str, message_id: str, event_type: str, body: bytes) -> Attempt:
        start = time.perf_counter()

        def elapsed() -> int:
            return int((time.perf_counter() - start) * 1000)

        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"Fluxbase-Webhooks/{__version__}",
            "X-Fluxbase-Event": event_type,
            **signing.headers(secret, message_id, int(time.time()), body),
        }
        tracing.inject(headers)  # the receiver may continue the attempt's trace (traceparent)
        limit = self.settings.response_body_max
        try:
            async with self._http.request(
                "POST", url, data=body, headers=headers, timeout_s=self.settings.timeout_s
            ) as resp:
                raw = await resp.content.read(limit * 4)
                text = raw.decode("utf-8", "replace")[:limit]
                ok = 200 <= resp.status < 300
                error = None if ok else f"HTTP {resp.status}"
                if 300 <= resp.status < 400:
                    error = f"HTTP {resp.status} (redirects are not followed)"
                return Attempt(ok, resp.status, elapsed(), text, error)
        except TimeoutError:
            return Attempt(False, None, elapsed(), None, f"timed out after {self.settings.timeout_s:g}s")
        except (ssrf.ForbiddenTarget, ValidationError) as exc:
            return Attempt(False, None, elapsed(), None, f"refused: {exc}"[:500])
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Attempt(False, None, elapsed(), None, connection_error(exc)[:500])


def connection_error(exc: BaseException) -> str:
    """A failed request in plain words (aiohttp's own text says `ssl:default` even for http)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"could not connect to {exc.host}:{exc.port}: its TLS certificate is not valid"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"could not connect to {exc.host}:{exc.port}: the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection without answering"
    if isinstance(exc, (aiohttp.ClientPayloadError, asyncio.IncompleteReadError)):
        return "the receiver's answer was cut off"
    if isinstance(exc, OSError):
        return f"connection failed: {_os_reason(exc)}"
    return f"connection failed: {exc}"


def _os_reason(exc: OSError) -> str:
    reasons = {
        errno.ECONNREFUSED: "connection refused",
        errno.ECONNRESET: "connection reset",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.ETIMEDOUT: "timed out",
    }
    if exc.errno in reasons:
        return reasons[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()
