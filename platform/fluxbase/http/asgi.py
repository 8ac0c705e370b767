"""ASGI entry point for uvicorn workers: each worker process loads settings once from its env."""

from __future__ import annotations

import logging
import os

from litestar import Litestar

from fluxbase.config import load_settings
from fluxbase.http.app import create_app


def create_from_env() -> Litestar:
    settings = load_settings(os.environ)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    return create_app(settings)
