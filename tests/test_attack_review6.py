"""Hostile review 6: this session's new surfaces (the retry of requests whose session lost its
prepared statements, `realtime.broadcast` from SQL, the dashboard's new parts, the connection
budget), attacked through the public HTTP API.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The database fixture (`control_db`) is used only to observe
effects, never to set an attack up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxbase.security.roles import role_name
from support import Api
from test_attack_review1 import batch, browser_key, end_user, sql
from test_connection_budget import Small, _small

# -- 1. the retry of a request whose session lost its prepared statements ------------------------

# tenancy/session.py `on_connection` runs a request again, up to 16 more times on fresh sessions,
# whenever the failure carries SQLSTATE 26000 or 42P05 (tenancy.errors.tampered). It cannot tell
# the platform's own statement gone missing from the project's SQL raising that code itself:
# `RAISE … USING ERRCODE = '26000'` in a function any principal may call makes every request
# that calls it run 17 times, each on a newly opened backend (the old one is terminated), each
# with a fresh request deadline, for one request of the rate limit.
LOST = [
    "CREATE SEQUENCE attempts",
    """CREATE FUNCTION lost() RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM nextval('attempts');  -- not rolled back: counts the runs
    RAISE EXCEPTION 'no such statement' USING ERRCODE = '26000';
END $f$""",
    """CREATE FUNCTION slow_lost(s float8) RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM nextval('attempts');
    PERFORM pg_sleep(s);
    RAISE EXCEPTION 'no such statement' USING ERRCODE = '26000';
END $f$""",
]


async def _runs(api: Api, project: Any) -> int:
    out = await sql(api, project.admin_key, project.id, "SELECT last_value, is_called FROM attempts")
    assert out["success"], out
    row = out["result"]["rows"][0]
    return int(row["last_value"]) if row["is_called"] else 0


async def _setup_lost(api: Api, project: Any) -> None:
    out = await batch(api, project.admin_key, project.id, LOST)
    assert out["success"], out


@pytest.mark.parametrize("who", ["admin", "end user"])
async def test_a_statement_raising_26000_itself_runs_once(api: Api, project: Any, who: str) -> None:
    await _setup_lost(api, project)
    if who == "admin":
        out = await sql(api, project.admin_key, project.id, "SELECT lost()")
    else:
        key = await browser_key(api, project)
        _uid, token = await end_user(api, project.id)
        out = await sql(api, key, project.id, "SELECT lost()", token)
    assert not out["success"], out
    runs = await _runs(api, project)
    assert runs == 1, f"one {who} request ran the statement {runs} times"


async def test_the_retry_stays_within_one_request_deadline(api: Api, project: Any) -> None:
    await _setup_lost(api, project)
    # Each run sleeps 0.3 s; one request may take about one run's time (plus connection setup),
    # not seventeen.
    t0 = time.monotonic()
    out = await sql(api, project.admin_key, project.id, "SELECT slow_lost(0.3)")
    elapsed = time.monotonic() - t0
    assert not out["success"], out
    runs = await _runs(api, project)
    assert runs <= 2 and elapsed < 1.5, f"one request ran {runs} times for {elapsed:.1f} s"


# -- 4. the connection budget ---------------------------------------------------------------------

# tenancy/pools.py ConnectionBudget: at the budget an opener closes an idle connection of any
# pool, else waits (first come, first served) for up to the acquire timeout. Nothing bounds one
# project's share: its pools (admin, readwrite, read; with and without end users) may hold every
# slot with slow statements, and every other project's requests wait and fail with 503. With the
# defaults one project's roles may hold 60 of the 64 slots (3 roles x FLUXBASE_TENANT_CONNECTION_LIMIT
# 20); here the budget is 4 and one project holds all four with four admin requests.
STARVE_BUDGET = 4


@pytest.fixture(scope="module")
async def small_budget(stack: Any, spawn: Any) -> AsyncIterator[Small]:
    async with _small(
        stack,
        spawn,
        FLUXBASE_TENANT_CONNECTION_BUDGET=str(STARVE_BUDGET),
        FLUXBASE_TENANT_ACQUIRE_TIMEOUT_SECONDS="2",
    ) as s:
        await s.add_projects(2)
        yield s


async def test_one_project_cannot_hold_every_budget_slot(small_budget: Small) -> None:
    """Project A sends as many slow requests as the budget has slots: it gets at most its share
    (half the budget; its other requests wait for its own connections, then answer 503), and
    project B's request is served meanwhile."""
    (a, ka), (b, kb) = small_budget.projects
    api = small_budget.api
    hogs = [asyncio.create_task(api.sql(ka, a, "SELECT pg_sleep(5)")) for _ in range(STARVE_BUDGET)]
    try:
        busy, peak = 0, 0
        for _ in range(40):  # until the hog holds all it can
            busy = await small_budget.su.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND usename = $2 AND state = 'active'",
                small_budget.inst.dbname,
                role_name(a, "admin"),
            )
            peak = max(peak, busy)
            await asyncio.sleep(0.05)
        assert 1 <= peak < STARVE_BUDGET, peak
        r = await api.sql(kb, b, "SELECT 1 AS one")
        assert r.status_code == 200 and r.json()["success"], f"the other project: {r.status_code} {r.text}"
    finally:
        for r in await asyncio.gather(*hogs):
            # the hog's requests past its share wait for its own connections, then answer 503
            assert r.status_code == 200 or r.json()["error"]["code"] == "DATABASE_CONNECTION_ERROR", r.text


# -- 3. the dashboard's new parts ----------------------------------------------------------------

# POST /dashboard/import takes the export file as an unbounded raw body (request_max_body_size=None,
# streamed to a spool file by the handler). The dashboard router's before_request hook
# (web.check_csrf) looked for the CSRF token in the parsed form when no X-CSRF-Token header came:
# `request.form()` read the whole body into memory first, before any sign-in check, with no size
# limit on this route (160 MB sent: +470 MB peak RSS). Fixed: only bounded bodies are parsed for
# the token; the import page's script sends the header (seen failing before the fix).
BODY_MB = 160


def _peak_rss_kib(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            total += int(line.split()[1])
    return total


async def _big_form() -> AsyncIterator[bytes]:
    yield b"a="
    chunk = b"x" * (1024 * 1024)
    for _ in range(BODY_MB):
        yield chunk


async def test_an_anonymous_import_post_is_refused_before_its_body_is_read(instance: Any) -> None:
    pid = instance.server.proc.pid
    before = _peak_rss_kib(pid)
    async with httpx.AsyncClient(base_url=instance.url, timeout=120) as http:
        try:
            r = await http.post(
                "/dashboard/import",
                content=_big_form(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            status = r.status_code
        except httpx.HTTPError:  # the server may answer and close before the body is sent
            status = None
    grew_mb = (_peak_rss_kib(pid) - before) / 1024
    assert status in (None, 401, 403, 413, 303), status
    assert grew_mb < BODY_MB / 4, f"an anonymous {BODY_MB} MB POST: the API's peak memory +{grew_mb:.0f} MB"


# -- 2. realtime.broadcast from SQL ----------------------------------------------------------------

# A WebSocket or HTTP broadcast costs one hit of the key's rate limit each (server.py _broadcast,
# "As POST /api/realtime/broadcast: … the key's rate limit"). realtime.broadcast() costs nothing
# of it: one execute-sql request of a readwrite key limited to 3 requests a minute puts thousands
# of broadcasts into the outbox, each delivered to every subscriber of the topic. Fixed by
# sql/0042: a transaction may broadcast what is left of its credential's window (at most 1 000).
FLOOD = 5000


async def test_one_request_cannot_emit_more_broadcasts_than_the_keys_rate_limit(
    api: Api, project: Any, control_db: Any
) -> None:
    key = await api.new_key(project.owner_token, project.id, "readwrite", rateLimitRequests=3)
    before = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", project.id
    )
    out = await sql(
        api,
        key,
        project.id,
        "SELECT count(realtime.broadcast('room', jsonb_build_object('i', g)))"
        f" FROM generate_series(1, {FLOOD}) g",
    )
    after = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", project.id
    )
    sent = after - before
    assert sent <= 3, f"one request of a key limited to 3 requests emitted {sent} broadcasts ({out})"


# The fix of hostile review 5 runs a request again on another session when its session lost its
# statements, but only requests (`on_connection`): platform work in `admin_session` (RLS
# management, migrations, imports, extensions) shares the admin pool with admin keys' requests and
# answers 503 instead. An admin key's `DO` block so still breaks the owner's next RLS page (and
# the dashboard's), once per pooled session it has tampered with. The name never shows (checked).
DEALLOCATE = "DO $d$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $d$"


async def test_deallocate_all_does_not_break_the_owners_rls_management(api: Api, project: Any) -> None:
    pid = project.id
    setup = await sql(
        api, project.admin_key, pid, "CREATE TABLE IF NOT EXISTS rls_target (id int PRIMARY KEY)"
    )
    assert setup["success"], setup
    owner = {"Authorization": f"Bearer {project.owner_token}"}
    r = await api.http.get(f"/api/projects/{pid}/rls", headers=owner)  # caches its statements
    assert r.status_code == 200, r.text
    out = await sql(api, project.admin_key, pid, DEALLOCATE)  # the same (LIFO) admin session
    assert out["success"], out
    r = await api.http.get(f"/api/projects/{pid}/rls", headers=owner)
    assert 'prepared statement "' not in r.text and "__" not in r.text, r.text  # held
    assert r.status_code == 200, r.text
