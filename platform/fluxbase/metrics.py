"""Process metrics in the Prometheus text format (version 0.0.4), and who may read them.

A few counters, gauges and histograms with fixed label names; each process (API worker,
realtime service, worker) has one `REGISTRY` and answers `GET /metrics` from it. Label values
must come from bounded sets (route templates, status codes, reader names), never raw paths,
project ids or user input. Gauges that mirror live state are filled at scrape time by
collectors (`REGISTRY.on_scrape`). No dependency: the format is a few lines of text.

Access: with FLUXBASE_METRICS_TOKEN set, a request needs `Authorization: Bearer <token>`;
without it, only loopback clients (127.0.0.0/8, ::1) are answered, and never a request that
carries a proxy's forwarding header.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import ipaddress
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DENIED = b'{"success":false,"error":{"code":"AUTH_REQUIRED","message":"Metrics need the metrics token."}}'
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]
M = TypeVar("M", bound="_Metric")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Labels = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels

    def _key(self, labels: Labels) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}")
        return tuple(str(v) for v in labels)

    def _label_text(self, values: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.label_names, values, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Labels = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[Labels, float] = {} if labels else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{self._label_text(key)} {_fmt(value)}"


class Gauge(Counter):
    """A value that goes up and down (often set at scrape time)."""

    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        self.values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self.values = {} if self.label_names else {(): 0.0}


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Labels = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, list[float]] = {}  # per bucket counts, then +Inf, sum

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def count(self, *labels: str) -> float:
        row = self.series.get(self._key(labels))
        return sum(row[:-1]) if row else 0.0

    def samples(self) -> Iterable[str]:
        for key, row in sorted(self.series.items()):
            cumulative = 0.0
            for bound, n in zip((*self.buckets, math.inf), row[:-1], strict=True):
                cumulative += n
                yield f"{self.name}_bucket{self._label_text(key, (('le', _fmt(bound)),))} {_fmt(cumulative)}"
            yield f"{self.name}_sum{self._label_text(key)} {_fmt(row[-1])}"
            yield f"{self.name}_count{self._label_text(key)} {_fmt(cumulative)}"


Collector = Callable[[], Awaitable[None] | None]


class Registry:
    """The metrics of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def _add(self, metric: M) -> M:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric):
                raise ValueError(f"metric {metric.name} registered twice with different kinds")
            return existing  # type: ignore[return-value]
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Labels = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Labels = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))

    def histogram(
        self, name: str, help_text: str, labels: Labels = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))

    def on_scrape(self, collector: Collector) -> Callable[[], None]:
        """Run `collector` before each rendering (to set gauges from live state); returns an
        undo for when its owner goes away."""
        self._collectors.append(collector)
        return lambda: self._collectors.remove(collector) if collector in self._collectors else None

    async def render(self) -> bytes:
        for collect in list(self._collectors):
            try:
                result = collect()
                if result is not None:
                    await result
            except Exception:  # a failing collector must not hide the others
                self.counter(
                    "fluxbase_metrics_collector_errors_total", "Scrape-time collectors that failed."
                ).inc()
        return "".join(m.render() for m in self._metrics.values()).encode()


REGISTRY = Registry()

# Shared by every process kind: the object store is used by the API and the worker.
S3_ERRORS = REGISTRY.counter(
    "fluxbase_s3_errors_total", "S3 requests that failed: unreachable, or an error answer.", ("kind",)
)


PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def allowed(
    token: str | None, authorization: str | None, client_host: str | None, proxied: bool = False
) -> bool:
    """Whether a /metrics request may be answered (see the module docstring). Without a token,
    a request a proxy forwarded (`proxied`: it carries a forwarding header) is refused even from
    loopback: a reverse proxy on the same host would otherwise open /metrics to everyone."""
    if token:
        given = (authorization or "").strip()
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
    if proxied:
        return False
    try:
        if client_host is None:
            return False
        address = ipaddress.ip_address(client_host.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback
    except ValueError:
        return False


OUTBOX_LAG = REGISTRY.gauge(
    "fluxbase_outbox_lag_seconds",
    "Seconds since an outbox reader last found the outbox drained (0 while it is), by reader.",
    ("reader",),
)


async def serve_metrics(host: str, port: int, token: str) -> asyncio.Server:
    """A minimal HTTP listener answering `GET /metrics` and `GET /live` (the worker has no other
    HTTP server; `/live` carries no data, so it needs no token: a container's liveness probe)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
            }
            peer = writer.get_extra_info("peername")
            proxied = any(h in headers for h in PROXY_HEADERS)
            if method == "GET" and path == "/live":
                status, ctype, body = "200 OK", "application/json", b'{"status":"ok"}'
            elif method != "GET" or path != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            elif not allowed(token, headers.get("authorization"), peer[0] if peer else None, proxied):
                status, ctype, body = "401 Unauthorized", "application/json", DENIED
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE, await REGISTRY.render()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=16 * 1024)
