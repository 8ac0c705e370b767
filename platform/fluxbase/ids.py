"""Identifier formats shared by the services."""

from __future__ import annotations

import re
import secrets

PROJECT_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def project_id() -> str:
    return secrets.token_hex(8)


def prefixed(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def valid_project_id(value: str) -> bool:
    return bool(PROJECT_ID_RE.match(value))
