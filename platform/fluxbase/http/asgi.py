"""ASGI entry point for uvicorn workers: each worker process loads settings once from its env."""

from __future__ import annotations

import logging
import os

from fluxbase.config import load_settings
from fluxbase.http.app import create_app
from fluxbase.http.fastpath import SqlFastPath
from fluxbase.http.requestlog import RequestLog


def create_from_env() -> SqlFastPath:
    settings = load_settings(os.environ)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    return SqlFastPath(create_app(settings))


def create_with_request_log() -> RequestLog:
    """`fluxbase api --request-log` (as `fluxbase dev` runs it): one line per request on stderr."""
    return RequestLog(create_from_env())
