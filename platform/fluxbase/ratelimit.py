"""In-process sliding-window rate limiter (per key or client; each API worker keeps its own)."""

from __future__ import annotations

import time
from collections import deque

from fluxbase.errors import RateLimited


class RateLimiter:
    """`hit(name, limit, window)` raises RateLimited with Retry-After once the window is full."""

    def __init__(self, max_names: int = 100_000):
        self._hits: dict[str, deque[float]] = {}
        self._max_names = max_names

    def hit(self, name: str, limit: int, window: float, now: float | None = None) -> None:
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
            raise RateLimited(int(q[0] + window - t) + 1)
        q.append(t)

    def _evict(self, now: float, window: float) -> None:
        for name in [n for n, q in self._hits.items() if not q or q[-1] <= now - window]:
            del self._hits[name]
