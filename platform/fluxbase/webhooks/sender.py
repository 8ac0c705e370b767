"""One signed POST to one endpoint: short timeout, no redirects, no cookies, guarded DNS."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from fluxbase import __version__
from fluxbase.config import WebhookSettings
from fluxbase.webhooks import signing, ssrf


@dataclass(frozen=True)
class Attempt:
    ok: bool
    status: int | None
    ms: int
    body: str | None
    error: str | None


class Sender:
    """An aiohttp session shared by every delivery of one process."""

    def __init__(self, settings: WebhookSettings):
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=ssrf.GuardedResolver(self.settings.allow_loopback),
                limit=max(8, self.settings.concurrency * 2),
                ttl_dns_cache=None,  # resolve on every new connection: the guard sees each answer
                use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # one receiver's cookies never reach another
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, url: str, secret: str, message_id: str, event_type: str, body: bytes) -> Attempt:
        start = time.perf_counter()

        def elapsed() -> int:
            return int((time.perf_counter() - start) * 1000)

        try:
            ssrf.check_literal(url, self.settings.allow_loopback)
        except ssrf.ForbiddenTarget as exc:
            return Attempt(False, None, 0, None, f"refused: {exc}")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"Fluxbase-Webhooks/{__version__}",
            "X-Fluxbase-Event": event_type,
            **signing.headers(secret, message_id, int(time.time()), body),
        }
        limit = self.settings.response_body_max
        try:
            async with self._client().post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
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
        except ssrf.ForbiddenTarget as exc:
            return Attempt(False, None, elapsed(), None, f"refused: {exc}")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, ssrf.ForbiddenTarget) else exc
            prefix = "refused" if isinstance(cause, ssrf.ForbiddenTarget) else "connection failed"
            return Attempt(False, None, elapsed(), None, f"{prefix}: {cause}"[:500])
