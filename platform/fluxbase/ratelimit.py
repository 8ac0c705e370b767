"""Request rate limits: `SharedRateLimiter` (every API and realtime replica shares the count, in
the control plane) and `RateLimiter` (an in-process sliding window, for one process alone).

The shared limiter does not go to PostgreSQL per request: a process leases a slice of a name's
window from `fluxbase.rate_leases` (sql/0038) and spends it locally, handing back what it did not
spend when it leases again. The slice is one token for limits under 200 (the documented numbers
then hold exactly across replicas) and about 1% of the limit above that (a round trip per slice;
a replica may then hold up to a slice that another replica's client cannot use until it is
handed back or its hold ends, so that client is refused at most (replicas - 1) x (slice - 1)
requests early). No window ever admits more than the limit: a request is admitted when the
table grants its token, and a one-token lease counts from then for one window; a larger slice is
spent within HOLD_S and counts from its grant for HOLD_S plus a window (see the migration). A
full window is remembered locally until its next token frees up (at most HOLD_S), so a flood of
refused requests costs no round trips.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import asyncpg
import msgspec

from fluxbase.db.control import fetchrow_stateless
from fluxbase.errors import RateLimited


class Quota(msgspec.Struct, frozen=True):
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


_LEASE = (
    "SELECT granted, counted, now_s, oldest, until_s FROM fluxbase.rate_lease($1, $2, $3, $4, $5, $6, $7, $8)"
)


class _Lease:
    """This process's slice of one name's window."""

    __slots__ = (
        "base",
        "counted",
        "db_t0",
        "full",
        "last",
        "left",
        "limit",
        "oldest",
        "reset_at",
        "spent",
        "t0",
        "until",
        "valid_until",
        "window",
    )

    def __init__(self) -> None:
        self.limit = 0
        self.window = 0.0
        self.left = 0  # tokens still to spend
        self.spent = 0
        self.full = False  # the table refused: the window is full until valid_until
        self.valid_until = 0.0  # monotonic: spend no token after this (also: refused until then)
        self.until: float | None = None  # the lease's `until` in the table (None: nothing held)
        self.t0 = 0.0  # monotonic time the lease was asked for
        self.db_t0 = 0.0  # the database's clock at the grant
        self.last = 0.0  # monotonic time of the last spend
        self.counted = 0  # tokens the table counted right after the grant
        self.oldest = 0.0  # seconds after t0 when the oldest counted token frees up
        self.base = 0  # max(0, limit - counted): the tokens left in the window beyond this lease
        self.reset_at = 0.0  # t0 + oldest: monotonic time the oldest counted token frees up


class SharedRateLimiter:
    """`await hit(name, limit, window)`, like `RateLimiter.hit`, with the count shared by every
    process through the control plane (a lease per name and process; see the module)."""

    HOLD_S = 1.0  # a lease is spent within this (longer: fewer round trips, more tokens held)
    MAX_SLICE = 1000

    def __init__(self, db: asyncpg.Pool, max_names: int = 100_000):
        self.db = db
        self._leases: dict[str, _Lease] = {}
        # The lease being asked for, per name: done when it is (the waiters then spend from it).
        self._leasing: dict[str, asyncio.Future[None]] = {}
        self._max_names = max_names
        self.round_trips = 0

    @classmethod
    def slice_of(cls, limit: int) -> int:
        """Tokens per lease: 1 under 200 (exact), else about 1% of the limit."""
        return max(1, min(cls.MAX_SLICE, limit // 100))

    def take(self, name: str, limit: int, window: float) -> Quota | None:
        """`hit`'s common path without a coroutine: a token of this process's lease for `name`,
        or None when there is none to spend now (then `await hit(...)`, which leases, waits for
        the lease in flight or refuses)."""
        lease = self._leases.get(name)
        if lease is None or lease.left <= 0 or lease.limit != limit or lease.window != window:
            return None
        now = time.monotonic()
        if now >= lease.valid_until:
            return None
        return self._spend(lease, now)

    async def hit(self, name: str, limit: int, window: float) -> Quota:
        while True:
            now = time.monotonic()
            lease = self._leases.get(name)
            if (
                lease is not None
                and lease.limit == limit
                and lease.window == window
                and now < lease.valid_until
            ):
                if lease.left > 0:
                    return self._spend(lease, now)
                if lease.full:
                    retry = max(1, math.ceil(lease.t0 + lease.oldest - now))
                    raise RateLimited(retry, quota=Quota(limit, 0, retry))
            leasing = self._leasing.get(name)
            if leasing is None:
                break
            # Another request of this process is leasing for this name: wait for it with every
            # other waiter at once (one loop iteration), then spend from what it got. (An
            # asyncio.Lock woke its waiters one loop iteration apart: at 32 clients each slice's
            # renewal queued ~16 requests for up to 50 ms, the whole 32-client p99.)
            await asyncio.shield(leasing)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leasing[name] = done
        try:
            return await self._lease(name, limit, window)
        finally:
            del self._leasing[name]
            done.set_result(None)

    def spent_out(self, name: str, limit: int, window: float) -> bool:
        """Whether this process's lease for `name` says its window has no token left for now:
        the table refused it, or counted the whole limit when it granted this process's last
        token, which is spent, and the oldest counted token has not freed up yet. A local hint
        (no round trip), never the decision (`hit` makes it): a request skips work that only an
        admitted request needs (hostile review 15: opening its tenant connection ahead)."""
        lease = self._leases.get(name)
        if lease is None or lease.left > 0 or lease.limit != limit or lease.window != window:
            return False
        return (lease.full or lease.counted >= limit) and time.monotonic() < lease.t0 + lease.oldest

    def _spend(self, lease: _Lease, now: float) -> Quota:
        lease.left -= 1
        lease.spent += 1
        lease.last = now
        reset = math.ceil(lease.reset_at - now)
        return Quota(lease.limit, lease.base + lease.left, reset if reset > 1 else 1)

    async def _lease(self, name: str, limit: int, window: float) -> Quota:
        """Lease a new slice (the only request of this process doing so for `name`: `hit`)."""
        lease = self._leases.get(name)
        now = time.monotonic()
        if lease is None:
            if len(self._leases) >= self._max_names:
                self._evict(now)
            lease = self._leases[name] = _Lease()
        # Hand the previous lease back: the unspent tokens stop counting, the spent ones count
        # until the last spend (on the database's clock, rounded up) plus the window.
        old = lease.until
        old_until = lease.db_t0 + (lease.last - lease.t0) + lease.window + 0.001 if lease.spent else 0.0
        # A one-token lease is spent by the request that took it: it counts from the grant for
        # exactly one window. A larger slice is spent within HOLD_S and counts that much longer.
        want = self.slice_of(limit)
        hold = self.HOLD_S if want > 1 else 0.0
        t0 = time.monotonic()
        self.round_trips += 1
        # One fixed statement (a function whose search_path is its own): no session state, so
        # its connection skips the pool's reset query (db/control.py).
        row = await fetchrow_stateless(
            self.db, _LEASE, name, limit, float(window), want, hold, old, old_until, lease.left
        )
        assert row is not None
        granted, counted, db_now, oldest = row["granted"], row["counted"], row["now_s"], row["oldest"]
        lease.limit, lease.window, lease.t0, lease.db_t0 = limit, window, t0, db_now
        lease.left, lease.spent, lease.last, lease.counted = granted, 0, t0, counted
        lease.full = granted == 0
        lease.until = row["until_s"] if granted else None  # the previous one was handed back
        lease.oldest = (oldest - db_now) if oldest is not None else window
        lease.base, lease.reset_at = max(0, limit - counted), t0 + lease.oldest  # (for _spend)
        # Spend nothing after the hold; a full window is believed until its oldest token frees
        # up, but at most HOLD_S (another replica may hand tokens back earlier).
        lease.valid_until = t0 + (hold if granted else min(self.HOLD_S, max(0.0, lease.oldest)))
        if granted == 0:
            retry = max(1, math.ceil(lease.oldest))
            raise RateLimited(retry, quota=Quota(limit, 0, retry))
        return self._spend(lease, time.monotonic())

    def _evict(self, now: float) -> None:
        for name in [n for n, le in self._leases.items() if le.valid_until <= now and n not in self._leasing]:
            del self._leases[name]
