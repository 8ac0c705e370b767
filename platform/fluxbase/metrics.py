"""Process metrics in the Prometheus text format (version 0.0.4), and who may read them.

A few counters, gauges and histograms with fixed label names; each process (API worker,
realtime service, worker) has one `REGISTRY` and answers `GET /metrics` from it. Label values
must come from bounded sets (route templates, status codes, reader names), never raw paths,
project ids or user input. Gauges that mirror live state are filled at scrape time by
collectors (`REGISTRY.on_scrape`). No dependency: the format is a few lines of text.

Several processes, one answer (the API's uvicorn workers): `Registry.share(directory)` makes
every update also write the new value into this process's file in `directory` (a memory map of
float slots, see `SharedStore`), and a scrape of any process then merges every file there:
counters and histograms summed over all processes, dead ones included (a counter never goes
down because a worker died); gauges over the processes still alive (summed, or the maximum for
a ratio). Gauges that collectors fill at scrape time are refreshed in every process every few
seconds, so a sibling's are at most that old.

Access: with FLUXBASE_METRICS_TOKEN set, a request needs `Authorization: Bearer <token>`;
without it, only loopback clients (127.0.0.0/8, ::1) are answered, and never a request that
carries a proxy's forwarding header.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import hmac
import ipaddress
import json
import math
import mmap
import os
import secrets
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
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


class SharedStore:
    """This process's metric values in a file that sibling processes read: a header (bytes
    used), then entries of a key (JSON `[name, labels, slot]`) and one float each, appended once
    and updated in place. An entry is written before the header counts it, so a reader never
    sees half of one."""

    SUFFIX = ".metrics"
    _INITIAL = 64 * 1024

    def __init__(self, directory: Path, prefix: str) -> None:
        self.path = directory / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}{self.SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "r+b")
        self._file.truncate(self._INITIAL)
        self._mm = mmap.mmap(self._file.fileno(), self._INITIAL)
        self._used = 8
        struct.pack_into("<Q", self._mm, 0, self._used)
        self._offsets: dict[tuple[str, Labels, int], int] = {}

    def set(self, name: str, labels: Labels, slot: int, value: float) -> None:
        offset = self._offsets.get((name, labels, slot))
        if offset is None:
            offset = self._append(name, labels, slot)
        struct.pack_into("<d", self._mm, offset, value)

    def _append(self, name: str, labels: Labels, slot: int) -> int:
        key = json.dumps([name, list(labels), slot]).encode()
        size = 4 + len(key)
        size += -size % 8
        if self._used + size + 8 > len(self._mm):
            capacity = max(len(self._mm) * 2, self._used + size + 8)
            self._file.truncate(capacity)
            self._mm.close()
            self._mm = mmap.mmap(self._file.fileno(), capacity)
        struct.pack_into(f"<I{len(key)}s", self._mm, self._used, len(key), key)
        offset = self._used + size
        struct.pack_into("<d", self._mm, offset, 0.0)
        self._used = offset + 8
        struct.pack_into("<Q", self._mm, 0, self._used)
        self._offsets[(name, labels, slot)] = offset
        return offset

    @staticmethod
    def read(path: Path) -> Iterable[tuple[str, Labels, int, float]]:
        """The entries of one process's file (of any process; a torn tail is left out)."""
        try:
            data = path.read_bytes()
        except OSError:
            return
        if len(data) < 8:
            return
        (used,) = struct.unpack_from("<Q", data, 0)
        pos, end = 8, min(used, len(data))
        while pos + 4 <= end:
            (n,) = struct.unpack_from("<I", data, pos)
            key_end = pos + 4 + n
            value_at = key_end + (-(4 + n) % 8)
            if value_at + 8 > end:
                return
            try:
                name, labels, slot = json.loads(data[pos + 4 : key_end])
            except ValueError:
                return
            yield (
                str(name),
                tuple(str(v) for v in labels),
                int(slot),
                struct.unpack_from("<d", data, value_at)[0],
            )
            pos = value_at + 8


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Labels = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels
        self.store: SharedStore | None = None

    def write_all(self) -> None:
        """Write every current value to `store` (when it is attached)."""
        raise NotImplementedError

    def empty(self) -> _Metric:
        """A metric of the same definition with no values (to merge processes' values into)."""
        raise NotImplementedError

    def _key(self, labels: Labels) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}")
        for v in labels:  # (the hot path passes strings: no new tuple then)
            if type(v) is not str:
                return tuple(str(v) for v in labels)
        return tuple(labels)

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
        self.inc_key(self._key(labels), amount)

    def inc_key(self, key: Labels, amount: float = 1.0) -> None:
        """`inc` with the labels already a key: a tuple of strings, one per label name (a hot
        path builds it once)."""
        value = self.values[key] = self.values.get(key, 0.0) + amount
        if self.store is not None:
            self.store.set(self.name, key, 0, value)

    def get(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def write_all(self) -> None:
        if self.store is not None:
            for key, value in self.values.items():
                self.store.set(self.name, key, 0, value)

    def empty(self) -> Counter:
        return Counter(self.name, self.help, self.label_names)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{self._label_text(key)} {_fmt(value)}"


class Gauge(Counter):
    """A value that goes up and down (often set at scrape time)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Labels = (), merge: str = "sum") -> None:
        super().__init__(name, help_text, labels)
        if merge not in ("sum", "max"):
            raise ValueError("merge is sum or max")
        self.merge = merge  # how the values of several processes combine

    def set(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        self.values[key] = float(value)
        if self.store is not None:
            self.store.set(self.name, key, 0, float(value))

    def clear(self) -> None:
        if self.store is not None:  # an entry stays in the file: NaN marks it unset
            for key in self.values:
                self.store.set(self.name, key, 0, math.nan)
        self.values = {} if self.label_names else {(): 0.0}
        self.write_all()

    def empty(self) -> Gauge:
        return Gauge(self.name, self.help, self.label_names, self.merge)


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
        self.observe_key(value, self._key(labels))

    def observe_key(self, value: float, key: Labels) -> None:
        """`observe` with the labels already a key (as for `Counter.inc_key`)."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
        slot = bisect.bisect_left(self.buckets, value)
        row[slot] += 1
        row[-1] += value
        if self.store is not None:
            self.store.set(self.name, key, slot, row[slot])
            self.store.set(self.name, key, len(row) - 1, row[-1])

    def observe_many(self, values: Sequence[float], key: Labels) -> None:
        """`observe_key` of each of `values` (a hot path's observations, added up in C)."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
        slots = collections.Counter(map(functools.partial(bisect.bisect_left, self.buckets), values))
        for slot, n in slots.items():
            row[slot] += n
        row[-1] += sum(values)
        if self.store is not None:
            for slot in slots:
                self.store.set(self.name, key, slot, row[slot])
            self.store.set(self.name, key, len(row) - 1, row[-1])

    def write_all(self) -> None:
        if self.store is not None:
            for key, row in self.series.items():
                for slot, value in enumerate(row):
                    self.store.set(self.name, key, slot, value)

    def empty(self) -> Histogram:
        return Histogram(self.name, self.help, self.label_names, self.buckets)

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
        self._store: SharedStore | None = None
        self._shared_dir: Path | None = None

    def _add(self, metric: M) -> M:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric):
                raise ValueError(f"metric {metric.name} registered twice with different kinds")
            return existing  # type: ignore[return-value]
        self._metrics[metric.name] = metric
        metric.store = self._store
        metric.write_all()
        return metric

    @property
    def shared(self) -> bool:
        return self._store is not None

    def share(self, directory: str | Path, prefix: str = "api") -> Path:
        """Write this process's values to a new file in `directory` from now on, and answer
        scrapes for every process with a file there (see the module docstring)."""
        self._shared_dir = Path(directory)
        self._store = SharedStore(self._shared_dir, prefix)
        for metric in self._metrics.values():
            metric.store = self._store
            metric.write_all()
        return self._store.path

    async def collect(self) -> None:
        """Run the scrape-time collectors (a failing one counts, and hides no other)."""
        for collect in list(self._collectors):
            try:
                result = collect()
                if result is not None:
                    await result
            except Exception:
                self.counter(
                    "fluxbase_metrics_collector_errors_total", "Scrape-time collectors that failed."
                ).inc()

    async def refresh_forever(self, every_s: float = 5.0) -> None:
        """Keep this process's collected gauges in its shared file at most `every_s` old."""
        while True:
            await self.collect()
            await asyncio.sleep(every_s)

    def _merged(self) -> list[_Metric]:
        """Every process's values in `_shared_dir`, merged (see the module docstring)."""
        assert self._shared_dir is not None
        merged: dict[str, _Metric] = {name: m.empty() for name, m in self._metrics.items()}
        for metric in merged.values():
            if isinstance(metric, Counter):
                metric.values = {}
        for path in sorted(self._shared_dir.glob(f"*{SharedStore.SUFFIX}")):
            try:
                alive = _alive(int(path.name.split("-")[1]))
            except (IndexError, ValueError):
                continue
            for name, labels, slot, value in SharedStore.read(path):
                into = merged.get(name)
                if into is None or math.isnan(value) or len(labels) != len(into.label_names):
                    continue
                if isinstance(into, Histogram):
                    row = into.series.setdefault(labels, [0.0] * (len(into.buckets) + 2))
                    if slot < len(row):
                        row[slot] += value
                elif isinstance(into, Gauge):
                    if alive:
                        was = into.values.get(labels)
                        if was is not None:
                            value = max(was, value) if into.merge == "max" else was + value
                        into.values[labels] = value
                elif isinstance(into, Counter):
                    into.values[labels] = into.values.get(labels, 0.0) + value
        for metric in merged.values():  # an unlabelled metric always has its one sample
            if isinstance(metric, Counter) and not metric.label_names and () not in metric.values:
                metric.values[()] = 0.0
        return list(merged.values())

    def counter(self, name: str, help_text: str, labels: Labels = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Labels = (), merge: str = "sum") -> Gauge:
        """`merge`: how the values of several processes combine when shared (sum or max)."""
        return self._add(Gauge(name, help_text, labels, merge))

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
        await self.collect()
        metrics = self._merged() if self._shared_dir is not None else self._metrics.values()
        return "".join(m.render() for m in metrics).encode()


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
