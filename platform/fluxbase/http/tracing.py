"""OpenTelemetry tracing of API requests when its SDK is installed (set up by fluxbase.tracing).

One SERVER span per request, child of an incoming W3C
`traceparent`, named by the route template; its attributes are the method, the route template,
the status and the request id: never the path, the query or a header, which may carry a
credential."""

from __future__ import annotations

from typing import Any

from fluxbase.http.requestlog import REQUEST_ID_KEY
from fluxbase.tracing import tracer_from_env

__all__ = ["TraceRequests", "tracer_from_env"]


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
