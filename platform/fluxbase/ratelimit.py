"""In-process sliding-window rate limiter (per key or client; each API worker keeps its own)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from fluxbase.errors import RateLimited


@dataclass(frozen=True)
class Quota:
    """Where a caller stands after a counted request: the answer's X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_s: int  # seconds until the oldest counted request leaves the window

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as an ASGI answer carries them (the SQL fast path's, built directly)."""
        return [
            (b"x-ratelimit-limit", b"%d" % self.limit),
            (b"x-ratelimit-remaining", b"%d" % self.remaining),
            (b"x-ratelimit-reset", b"%d" % self.reset_s),
        ]


class RateLimiter:
    """`hit(name, limit, window)` counts a request and answers the Quota left, or raises
    RateLimited (with Retry-After and the X-RateLimit-* headers) once the window is full."""

    def __init__(self, max_names: int = 100_000):
        self._hits: dict[str, deque[float]] = {}
        self._max_names = max_names

    def hit(self, name: str, limit: int, window: float, now: float | None = None) -> Quota:
        t = time.monotonic() if now is None else now
        q = self._hits.get(name)
        if q is None:
            if len(self._hits) >= self._max_names:
                self._evict(t, window)
            q = self._hits[name] = deque()
        cutoff = t - window
        while q and q[0] <= cutoff:
            q.popleft()
        if len(q) >= limit:
            retry = int(q[0] + window - t) + 1
            raise RateLimited(retry, quota=Quota(limit, 0, retry))
        q.append(t)
        return Quota(limit, limit - len(q), int(q[0] + window - t) + 1)

    def _evict(self, now: float, window: float) -> None:
        for name in [n for n, q in self._hits.items() if not q or q[-1] <= now - window]:
            del self._hits[name]
