"""JSON values sent to the API: exact numbers, ISO times, base64 bytes (docs/sql.md "Values")."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any


def to_json(value: Any) -> Any:
    """`value` with Decimal, datetime, UUID and bytes turned into what the API binds exactly."""
    if isinstance(value, Decimal):
        return str(value)  # numeric: exact digits, never a rounded float
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value
