"""OpenTelemetry tracing for every Fluxbase process when its SDK is installed; no hard dependency.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (the SDK's own variable): `console` (spans as
JSON on stdout) or `otlp` (needs `opentelemetry-exporter-otlp-proto-http`; its endpoint and
headers come from the SDK's `OTEL_EXPORTER_OTLP_*` variables). `OTEL_SERVICE_NAME` names the
service (default `fluxbase-api`, `fluxbase-realtime`, `fluxbase-worker`).

`setup` installs the process's tracer; `span(name, kind, attributes)` opens a span under the
current one (the API's request span, which continues the caller's `traceparent`), or does
nothing at all when tracing is off: the hot paths pay one global lookup. Spans carry bounded,
public-safe attributes only: a statement's kind, never its text or parameters (literals); a
webhook's ids and status, never its URL (it may carry a credential). Exceptions are not
recorded (a driver's message may quote a literal); a failed span carries a code instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("fluxbase")

_tracer: Any | None = None


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass


_OFF = contextlib.nullcontext(_NoSpan())


def tracer_from_env(environ: Mapping[str, str], service: str = "fluxbase-api") -> Any | None:
    """A tracer exporting as `OTEL_TRACES_EXPORTER` says, or None (tracing off)."""
    name = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name in ("", "none"):
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
            SpanProcessor,
        )
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=%s but the OpenTelemetry SDK is not installed: no tracing", name)
        return None
    processor: SpanProcessor
    if name == "console":
        processor = SimpleSpanProcessor(ConsoleSpanExporter())
    elif name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: no tracing")
            return None
        processor = BatchSpanProcessor(OTLPSpanExporter())
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (console or otlp): no tracing", name)
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or service})
    )
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider.get_tracer("fluxbase")


def setup(environ: Mapping[str, str], service: str) -> Any | None:
    """Install this process's tracer from the environment (None: tracing stays off)."""
    global _tracer
    _tracer = tracer_from_env(environ, service)
    return _tracer


def use(tracer: Any | None) -> None:
    """Install `tracer` (an SDK tracer, e.g. one with an in-memory exporter; None: off)."""
    global _tracer
    _tracer = tracer


def enabled() -> bool:
    return _tracer is not None


def span(name: str, kind: str = "internal", attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a span named `name` of `kind` (internal, client, server, consumer,
    producer) under the current span, yielding it; a no-op when tracing is off."""
    if _tracer is None:
        return _OFF
    return _span(name, kind, attributes)


@contextlib.contextmanager
def _span(name: str, kind: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind

    assert _tracer is not None
    with _tracer.start_as_current_span(
        name,
        kind=getattr(SpanKind, kind.upper()),
        attributes=dict(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            if not getattr(exc, "traced_as_ok", False):  # e.g. a path's "run me the other way"
                fail(current, exc)
            raise


def fail(current: Any, exc: BaseException) -> None:
    """Mark `current` failed with a public code (a FluxbaseError's code, a SQLSTATE, or the
    exception's type name), never the exception's message."""
    from opentelemetry.trace import StatusCode

    code = getattr(exc, "sqlstate", None) or getattr(exc, "code", None) or type(exc).__name__
    current.set_attribute("error.type", str(code)[:64])
    current.set_status(StatusCode.ERROR)


def inject(headers: dict[str, str]) -> None:
    """Add the current trace context (`traceparent`) to outgoing request headers."""
    if _tracer is None:
        return
    from opentelemetry import propagate

    propagate.inject(headers)


def statement_span(keyword: str) -> Any:
    """A CLIENT span around one tenant statement, named by its kind (its first keyword, e.g.
    SELECT): the statement's text and parameters never go into it."""
    if _tracer is None:
        return _OFF
    kind = keyword.upper() if keyword.isascii() and keyword.isalpha() and len(keyword) <= 32 else "SQL"
    return _span(
        kind, "client", {"db.system": "postgresql", "db.system.name": "postgresql", "db.operation.name": kind}
    )


def set_error(current: Any) -> None:
    """Mark `current` failed (its `error.type` set by the caller)."""
    if _tracer is None:
        return
    from opentelemetry.trace import StatusCode

    current.set_status(StatusCode.ERROR)
