"""Logging set-up for every Fluxbase process: text or JSON lines, each carrying the request id.

The id of the request being served lives in a context variable (`REQUEST_ID`), set by the
API's request wrapper (http.requestlog); a filter on the root handlers copies it into every
record, so every line a request causes — the request line, a warning from a service, an
exception — names the same id. FLUXBASE_LOG_FORMAT=json writes one JSON object per line.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
from typing import Any

import msgspec

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("fluxbase_request_id", default="-")

# Attributes every LogRecord has: anything else a caller passed as `extra=` goes into the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}
_encoder = msgspec.json.Encoder()


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request's id, '-' outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "requestId": getattr(record, "request_id", REQUEST_ID.get()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(doc).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger once per process (text or json), with the request id filter."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # botocore and asyncpg are chatty at INFO and may echo request details.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiobotocore").setLevel(logging.WARNING)
    # websockets logs every /live and /ready probe at INFO.
    logging.getLogger("websockets").setLevel(logging.WARNING)
