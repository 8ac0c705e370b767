"""Sessions whose prepared statements project SQL dropped (tenancy.session.on_connection).

A request that meets such a session runs once more on a session nobody tampered with (the
pool's idle sessions are closed first); a request that drops its own statements runs at most
twice, never in a loop; the answer never names a statement.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from support import Api, bearer
from test_attack_review1 import MANY, batch, sql
from test_attack_review5 import DEALLOCATE

NAME = re.compile(r"__asyncpg_(stmt|cursor)_")


async def test_a_request_that_drops_its_own_statements_runs_at_most_twice(
    api: Api, project: Any, instance_admin: dict[str, Any]
) -> None:
    pid, key = project.id, project.admin_key
    for q in ("CREATE TABLE t (v int)", "CREATE SEQUENCE runs"):
        assert (await sql(api, key, pid, q))["success"], q
    # A size cap: every writing transaction runs the platform's quota check before COMMIT.
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": 50_000_000},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    # Warm every pooled session: the quota check is cached (by name) on each.
    warm = await asyncio.gather(*(batch(api, key, pid, ["INSERT INTO t VALUES (0)"]) for _ in range(8)))
    assert all(w["success"] for w in warm), warm[:1]
    # The request counts its runs with a sequence (not rolled back), then drops the session's
    # statements, so its own quota check fails on that session.
    answer = await batch(api, key, pid, ["SELECT nextval('runs')", "INSERT INTO t VALUES (1)", DEALLOCATE])
    assert not NAME.search(str(answer)), answer
    if not answer["success"]:
        assert answer["error"]["code"] == "DATABASE_CONNECTION_ERROR", answer
    runs = (await sql(api, key, pid, "SELECT last_value FROM runs"))["result"]["rows"][0]["last_value"]
    assert 1 <= runs <= 2, runs  # one run, or one more on a fresh session: never a loop
    inserted = (await sql(api, key, pid, "SELECT count(*) AS n FROM t WHERE v = 1"))["result"]["rows"][0]["n"]
    assert inserted == (1 if answer["success"] else 0), (answer, inserted)  # committed once at most


async def test_other_principals_never_see_a_dropped_session(api: Api, project: Any) -> None:
    """Another admin key's DEALLOCATE ALL on many pooled sessions, then a burst of this key's
    cached statements: every request succeeds, none answers with a statement's name. The
    DEALLOCATE requests themselves succeed too: one that meets a session an earlier one dropped
    runs again on a session opened after that was found, never on another one in use meanwhile
    (which came back to the pool dropped as well: about one run in five failed so)."""
    pid = project.id
    victim = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=MANY)
    mallory = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=MANY)
    assert (await sql(api, victim, pid, "CREATE TABLE n (v int)"))["success"]
    probe = "SELECT count(*) AS c FROM n"
    for _ in range(6):
        warm = await asyncio.gather(*(sql(api, victim, pid, probe) for _ in range(8)))
        assert all(a["success"] for a in warm), warm[:1]
        dropped = await asyncio.gather(*(sql(api, mallory, pid, DEALLOCATE) for _ in range(8)))
        assert all(d["success"] for d in dropped), [d for d in dropped if not d["success"]][:2]
        answers = await asyncio.gather(*(sql(api, victim, pid, probe) for _ in range(12)))
        assert all(a["success"] for a in answers), [a for a in answers if not a["success"]][:2]
        assert not any(NAME.search(str(a)) for a in answers)
