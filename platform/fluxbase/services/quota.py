"""The database-size cap on the write path.

`fluxbase_guard.check_db_quota()` (sql/0010, sql/0012) measures the project schema and refuses
(FX413) a transaction that grows it past `projects.db_quota_bytes`. It runs before COMMIT of
every transaction of a capped project, and returns at once when the transaction wrote nothing
(no xid). Projects without a cap never send it (the cap comes with the project row).

An earlier version measured only when the statement looked large (its command tag's row count,
DDL) or the last measurement was old or near the cap: a data-modifying CTE (tag `SELECT 1`) or a
few hundred large rows wrote many times the cap in one request (hostile review 1). What a
statement writes cannot be read from its tag, so every writing transaction is measured: about
0.5 ms for a 20-table schema (`bench/db_quota.py`), for capped projects only.
"""

from __future__ import annotations

import re
import time

import asyncpg

from fluxbase.errors import DatabaseQuotaExceeded

CHECK_SQL = "SELECT fluxbase_guard.check_db_quota()"


class SizeCache:
    """Per-process last measured size of each capped project: (bytes, monotonic time)."""

    MAX = 10_000

    def __init__(self) -> None:
        self._sizes: dict[str, tuple[int, float]] = {}

    def needs_check(self, project_id: str, cap: int | None) -> bool:
        """Whether a writing transaction of this project is measured before COMMIT: always
        when it has a cap (see the module docstring for why no cheaper rule holds)."""
        return cap is not None

    def record(self, project_id: str, size: int | None) -> None:
        if size is None:
            return
        if len(self._sizes) >= self.MAX:
            self._sizes.clear()
        self._sizes[project_id] = (size, time.monotonic())

    def forget(self, project_id: str) -> None:
        self._sizes.pop(project_id, None)


def quota_exceeded(exc: asyncpg.PostgresError) -> DatabaseQuotaExceeded:
    """FX413 from fluxbase_guard.check_db_quota → the public 413 with size and limit."""
    m = re.match(r"size=(\d+) limit=(\d+)", getattr(exc, "detail", None) or "")
    size, limit = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return DatabaseQuotaExceeded(
        f"The project's database would be {size} bytes; its limit is {limit} bytes. "
        "Delete rows and vacuum to shrink it, or ask an instance admin to raise the limit.",
        extra={"sizeBytes": size, "limitBytes": limit},
    )


async def check(conn: asyncpg.Connection, project_id: str, sizes: SizeCache | None = None) -> None:
    """Measure inside the open transaction; raise DatabaseQuotaExceeded over the cap.

    On FX413 the transaction is left aborted: the caller rolls back as for any failure.
    """
    try:
        size = await conn.fetchval(CHECK_SQL)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == "FX413":
            raise quota_exceeded(exc) from None
        raise
    if sizes is not None:
        sizes.record(project_id, size)
