"""Broadcasts from SQL spend the request's rate limit (sql/0042, hostile review 6).

A transaction may call realtime.broadcast() at most as many times as its credential has requests
left in the window after the request itself (and never more than 1 000); past that the call
raises, the whole transaction rolls back (its other writes too) and the API answers 429
RATE_LIMIT. The counter is the transaction's own outbox rows, so nothing the tenant sets in its
session raises it past the hard cap."""

from __future__ import annotations

from typing import Any

import httpx

from support import Api


async def _sent(control_db: Any, pid: str) -> int:
    return int(
        await control_db.fetchval(
            "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", pid
        )
    )


def _flood(n: int) -> str:
    return (
        f"SELECT count(realtime.broadcast('room', jsonb_build_object('i', g))) FROM generate_series(1, {n}) g"
    )


async def _batch(api: Api, key: str, pid: str, statements: list[str]) -> httpx.Response:
    return await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": q} for q in statements]},
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_a_request_broadcasts_what_is_left_of_its_window_and_no_more(
    api: Api, project: Any, control_db: Any
) -> None:
    pid = project.id
    r = await api.sql(project.admin_key, pid, "CREATE TABLE marks (v int)")
    assert r.status_code == 200 and r.json()["success"], r.text
    # Limit 3: the request is the first hit, two are left for its broadcasts.
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    before = await _sent(control_db, pid)
    r = await api.sql(key, pid, _flood(2))  # the one-round-trip path
    assert r.status_code == 200 and r.json()["success"], r.text
    assert await _sent(control_db, pid) == before + 2

    # A fresh key of the same limit: three broadcasts in one request are one too many. The whole
    # transaction rolls back (the row written before the broadcasts too): 429 RATE_LIMIT.
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    r = await _batch(api, key, pid, ["INSERT INTO marks VALUES (1)", _flood(3)])  # explicit path
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["error"]["code"] == "RATE_LIMIT", body
    assert "at most 2 broadcasts" in body["error"]["message"], body
    assert "Retry-After" in r.headers
    assert await _sent(control_db, pid) == before + 2
    r = await api.sql(project.admin_key, pid, "SELECT count(*) AS n FROM marks")
    assert r.json()["result"]["rows"] == [{"n": 0}], r.text


async def test_an_admin_that_raises_its_cap_in_the_session_stays_under_the_hard_cap(
    api: Api, project: Any, control_db: Any
) -> None:
    pid = project.id
    admin = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=1_000_000)
    before = await _sent(control_db, pid)
    forge = "DO $$ BEGIN PERFORM set_config('fluxbase.broadcast_cap', '999999', true); END $$"
    r = await _batch(api, admin, pid, [forge, _flood(1001)])
    assert r.status_code == 429, r.text
    assert await _sent(control_db, pid) == before
    r = await _batch(api, admin, pid, [forge, _flood(1000)])
    assert r.status_code == 200 and r.json()["success"], r.text
    assert await _sent(control_db, pid) == before + 1000


async def test_a_rolled_back_savepoint_gives_its_broadcasts_back(
    api: Api, project: Any, control_db: Any
) -> None:
    pid = project.id
    key = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=3)
    before = await _sent(control_db, pid)
    body = """DO $$
BEGIN
    BEGIN
        PERFORM realtime.broadcast('room', '{}'::jsonb);
        PERFORM realtime.broadcast('room', '{}'::jsonb);
        RAISE EXCEPTION 'undo';
    EXCEPTION WHEN raise_exception THEN NULL;
    END;
    PERFORM realtime.broadcast('room', '{"kept": 1}'::jsonb);
    PERFORM realtime.broadcast('room', '{"kept": 2}'::jsonb);
END $$"""
    r = await api.sql(key, pid, body)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert await _sent(control_db, pid) == before + 2
