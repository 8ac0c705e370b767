"""The database-size cap on the write path, and what keeps it cheap far below the cap.

`fluxbase_guard.check_db_quota()` (sql/0010) measures the project schema and refuses (FX413) a
transaction that grows it past `projects.db_quota_bytes`. Measuring walks every relation of the
schema (about 0.5 ms for 20 tables, `bench/db_quota.py`), so the SQL hot path does not measure
every write:

* projects without a cap never send the check (zero cost; the cap comes with the project row);
* a capped project is measured before COMMIT when this process's last measurement of it is
  older than `FRESH_S`, or was at `NEAR` of the cap or more, or when the statement itself was
  large (`BIG_ROWS` rows or more, or DDL). Near the cap every writing transaction is measured,
  so the write that crosses it is refused; far below it, a project costs about one measured
  transaction per `FRESH_S` per API process. The price: small writes arriving faster than that
  can carry a project from under `NEAR` past the cap before the next measurement, which then
  refuses every further growing write until rows are deleted and the project vacuumed.

Rare paths (migrations, imports) always measure.
"""

from __future__ import annotations

import re
import time

import asyncpg

from fluxbase.errors import DatabaseQuotaExceeded

CHECK_SQL = "SELECT fluxbase_guard.check_db_quota()"
FRESH_S = 2.0
NEAR = 0.8
BIG_ROWS = 1000
DDL = frozenset(
    {"CREATE", "ALTER", "COMMENT", "GRANT", "REVOKE", "SECURITY", "REINDEX", "CLUSTER", "REFRESH"}
)


class SizeCache:
    """Per-process last measured size of each capped project: (bytes, monotonic time)."""

    MAX = 10_000

    def __init__(self) -> None:
        self._sizes: dict[str, tuple[int, float]] = {}

    def needs_check(self, project_id: str, cap: int | None, rows: int = 0, keyword: str = "") -> bool:
        if cap is None:
            return False
        if rows >= BIG_ROWS or keyword in DDL:
            return True
        hit = self._sizes.get(project_id)
        return hit is None or time.monotonic() - hit[1] > FRESH_S or hit[0] >= cap * NEAR

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
