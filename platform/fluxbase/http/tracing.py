"""OpenTelemetry tracing of API requests when its SDK is installed; no hard dependency.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (the SDK's own variable): `console` (spans as
JSON on stdout) or `otlp` (needs `opentelemetry-exporter-otlp-proto-http`; its endpoint and
headers come from the SDK's `OTEL_EXPORTER_OTLP_*` variables). `OTEL_SERVICE_NAME` names the
service (default `fluxbase-api`). One SERVER span per request, child of an incoming W3C
`traceparent`, named by the route template; its attributes are the method, the route template,
the status and the request id: never the path, the query or a header, which may carry a
credential."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fluxbase.http.requestlog import REQUEST_ID_KEY

log = logging.getLogger("fluxbase")


def tracer_from_env(environ: Mapping[str, str]) -> Any | None:
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
    service = environ.get("OTEL_SERVICE_NAME") or "fluxbase-api"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider.get_tracer("fluxbase")


class TraceRequests:
    """ASGI wrapper: one SERVER span per HTTP request (see the module docstring)."""

    def __init__(self, app: Any, tracer: Any):
        self.app = app
        self.tracer = tracer

    @property
    def state(self) -> Any:  # the wrapped app's state, for code that reaches through
        return self.app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, StatusCode

        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method = str(scope.get("method", "?"))
        status = 0

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = str(scope.get("path_template") or "")
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.response.status_code", status or 500)
                span.set_attribute("fluxbase.request_id", str(scope.get(REQUEST_ID_KEY, "")))
                if not status or status >= 500:
                    span.set_status(StatusCode.ERROR)
