"""ASGI entry point for uvicorn workers: each worker process loads settings once from its env."""

from __future__ import annotations

import os
from typing import Any

from fluxbase import metrics, tracing
from fluxbase.config import load_settings
from fluxbase.http.app import create_app
from fluxbase.http.fastpath import SqlFastPath
from fluxbase.http.requestlog import RequestLog
from fluxbase.http.tracing import TraceRequests
from fluxbase.logs import setup_logging


def create_from_env(terminal: bool = False) -> RequestLog:
    settings = load_settings(os.environ)
    setup_logging(settings.log_level, settings.log_format)
    if settings.http.metrics_dir and not metrics.REGISTRY.shared:
        metrics.REGISTRY.share(settings.http.metrics_dir, "api")
    fast = SqlFastPath(create_app(settings))
    app: Any = fast
    tracer = tracing.setup(os.environ, "fluxbase-api")
    if tracer is not None:
        app = TraceRequests(app, tracer)
    wrapper = RequestLog(
        app,
        terminal=terminal,
        json_log=settings.log_format == "json",
        metrics_token=settings.metrics_token,
    )
    if tracer is None and not terminal:
        # fluxbase.http.protocol answers execute-sql from here (it logs and counts like RequestLog;
        # spans and the terminal line stay with the ASGI path)
        wrapper.fast = fast
    return wrapper


def create_with_request_log() -> RequestLog:
    """`fluxbase api --request-log` (as `fluxbase dev` runs it): one line per request on stderr."""
    return create_from_env(terminal=True)
