"""Hostile review 2: attacks on the privilege model (sql/0012), realtime authorization
(sql/0015) and the round-1 fixes, through the public HTTP API.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The database fixture (`control_db`) is used only to observe
effects (what landed in the outbox), never to set an attack up.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from support import Api, bearer
from test_attack_review1 import MANY, batch, browser_key, end_user, sql
from test_realtime import _realtime, subscribe


async def forged_events(control_db: asyncpg.Pool, marker: str) -> list[asyncpg.Record]:
    return list(
        await control_db.fetch(
            "SELECT project_id, table_name, operation, record FROM fluxbase.events "
            "WHERE record::text LIKE $1",
            f"%{marker}%",
        )
    )


def cast_forge(target: str, marker: str, call: str = "") -> list[str]:
    """Statements that make a caller with no trigger of its own run `call` (default: a forged
    INSERT event for `target`) inside a trigger (pg_trigger_depth() = 1), with no platform
    trigger around it that would fail: a temporary enum with an implicit cast to integer, and a
    temporary foreign key from the enum to an integer key. The foreign key's check is a trigger, and
    its query casts the new row's value with the caller's function."""
    record = '{"owner": "victim", "v": "' + marker + '"}'
    call = call or (
        f"fluxbase_capture.write_events('{target}'::regclass, 'INSERT', ARRAY['{record}'::jsonb], NULL)"
    )
    return [
        "CREATE TYPE pg_temp.fx_e AS ENUM ('k')",
        "CREATE FUNCTION pg_temp.fx_text(pg_temp.fx_e) RETURNS integer LANGUAGE sql AS "
        f"$f$ SELECT 1 FROM (SELECT {call}) AS s $f$",
        "CREATE CAST (pg_temp.fx_e AS integer) WITH FUNCTION pg_temp.fx_text(pg_temp.fx_e) AS IMPLICIT",
        "CREATE TEMP TABLE fx_pk (k integer PRIMARY KEY)",
        "INSERT INTO pg_temp.fx_pk VALUES (1)",
        "CREATE TEMP TABLE fx_fk (e pg_temp.fx_e REFERENCES pg_temp.fx_pk (k))",
        "INSERT INTO pg_temp.fx_fk VALUES ('k')",
    ]


async def messages_table(api: Api, project: Any) -> None:
    for q in (
        "CREATE TABLE messages (owner text NOT NULL, v text NOT NULL)",
        "ALTER TABLE messages ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON messages USING (owner = auth.uid())",
        "CREATE POLICY ins ON messages FOR INSERT WITH CHECK (owner = auth.uid())",
    ):
        assert (await sql(api, project.admin_key, project.id, q))["success"], q


FORGE_HOLE = (
    "open hole: an end user (or any readwrite key) runs its own SQL function inside a trigger "
    "(the check trigger of a temporary foreign key calls its implicit cast), so write_events' "
    "pg_trigger_depth() test passes and it forges row events for any table of its project"
)


@pytest.fixture(scope="module")
def rt(instance: Any, log_dir: Any) -> Iterator[str]:
    with _realtime(instance, log_dir) as url:
        yield url


# -- 1. forged row events without a trigger of one's own ---------------------------------------------


async def test_end_user_cannot_forge_row_events_through_a_temp_cast(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid = project.id
    await messages_table(api, project)
    key = await browser_key(api, project)
    _uid, tok = await end_user(api, pid)
    marker = f"forged-{secrets.token_hex(4)}"
    body = await batch(api, key, pid, cast_forge(f"p_{pid}.messages", marker), tok)
    assert not await forged_events(control_db, marker), body


async def test_forged_row_event_does_not_reach_another_end_users_subscription(
    api: Api, project: Any, rt: str
) -> None:
    """The consequence: Mallory makes Victim's realtime client show a message row that no one
    wrote, attributed to Victim's own row (the policy `owner = auth.uid()` passes on the image)."""
    pid = project.id
    await messages_table(api, project)
    key = await browser_key(api, project)
    _m, mallory = await end_user(api, pid)
    victim, victim_tok = await end_user(api, pid)
    marker = f"forged-{secrets.token_hex(4)}"
    forge = cast_forge(f"p_{pid}.messages", marker)
    forge[1] = forge[1].replace('"owner": "victim"', f'"owner": "{victim}"')
    async with subscribe(rt, pid, victim_tok) as sub:
        body = await batch(api, key, pid, forge, mallory)
        got = await sub.silent(3.0)
    assert not any(marker in str(m) for m in got), (body, got)


async def test_read_key_cannot_forge_row_events_through_a_temp_cast(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid = project.id
    await messages_table(api, project)
    ro = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=MANY)
    marker = f"forged-{secrets.token_hex(4)}"
    body = await batch(api, ro, pid, cast_forge(f"p_{pid}.messages", marker))
    assert not await forged_events(control_db, marker), body


async def test_forged_events_never_reach_another_project(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Even from inside a trigger, write_events refuses a table of another project."""
    other = await api.new_project(project.owner_token, "victim")
    other_key = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    assert (await sql(api, other_key, other, "CREATE TABLE messages (owner text, v text)"))["success"]
    marker = f"forged-{secrets.token_hex(4)}"
    body = await batch(api, project.admin_key, project.id, cast_forge(f"p_{other}.messages", marker))
    assert not await forged_events(control_db, marker), body
    # and directly from an admin's own trigger
    marker2 = f"forged-{secrets.token_hex(4)}"
    rec = '{"v": "' + marker2 + '"}'
    for q in (
        "CREATE TABLE src (v text)",
        "CREATE FUNCTION fwd() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        f"PERFORM fluxbase_capture.write_events('p_{other}.messages'::regclass, 'INSERT', "
        f"ARRAY['{rec}'::jsonb], NULL); RETURN NULL; END $f$",
        "CREATE TRIGGER fwd AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION fwd()",
        "INSERT INTO src VALUES ('x')",
    ):
        await sql(api, project.admin_key, project.id, q)
    assert not await forged_events(control_db, marker2)


async def test_readwrite_cannot_announce_schema_events_through_a_temp_cast(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    marker = f"forged-{secrets.token_hex(4)}"
    call = (
        f"fluxbase_capture.write_schema_event('p_{pid}', 'messages', 'DROP TABLE', "
        '\'{"object": "%s"}\'::jsonb)' % marker
    )
    body = await batch(api, rw, pid, cast_forge("", marker, call))
    assert not await forged_events(control_db, marker), body


# -- 2. another project's room, tokens and history ---------------------------------------------------


async def _first_reply(url: str, room_project: str, token: str, **extra: Any) -> dict[str, Any]:
    async with connect(url, max_queue=None) as ws:
        await ws.send(
            json.dumps({"type": "subscribe", "roomId": f"project_{room_project}", "token": token, **extra})
        )
        return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))


async def test_no_credential_of_one_project_subscribes_to_another(api: Api, project: Any, rt: str) -> None:
    other = await api.new_project(project.owner_token, "victim")
    r = await api.http.post(
        "/api/realtime/token", json={"projectId": project.id}, headers=bearer(project.admin_key)
    )
    assert r.status_code == 201, r.text
    minted = r.json()["token"]
    _uid, user_tok = await end_user(api, project.id)
    for cred in (project.admin_key, minted, user_tok):
        reply = await _first_reply(rt, other, cred)
        assert reply["type"] != "subscribed", reply
    # minting for the other project with this project's key is refused too
    r = await api.http.post(
        "/api/realtime/token", json={"projectId": other}, headers=bearer(project.admin_key)
    )
    assert r.status_code in (401, 403, 404), r.text


async def test_replay_from_the_beginning_shows_only_the_own_project(api: Api, project: Any, rt: str) -> None:
    other = await api.new_project(project.owner_token, "victim")
    other_key = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    marker = f"theirs-{secrets.token_hex(4)}"
    for q in ("CREATE TABLE t (v text)", f"INSERT INTO t VALUES ('{marker}')"):
        assert (await sql(api, other_key, other, q))["success"], q
    assert (await sql(api, project.admin_key, project.id, "CREATE TABLE mine (v text)"))["success"]
    async with subscribe(rt, project.id, project.admin_key, since="0:0") as sub:
        got = await sub.silent(2.0)
    assert not any(marker in str(m) for m in got), got


# -- 3. the outbox as storage outside the quota ---------------------------------------------------------


async def test_outbox_writes_count_against_the_database_quota(
    api: Api, project: Any, instance_admin: dict[str, Any], control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    root = instance_admin["token"]
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    cap = r.json()["quotas"]["databaseUsedBytes"] * 4 + 65_536
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": cap}, headers=bearer(root)
    )
    assert r.status_code == 200, r.text
    big = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 40000) g)"
    for q in (
        "CREATE TABLE src (v text)",
        "CREATE FUNCTION stuff() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        f"PERFORM fluxbase_capture.write_events('src'::regclass, 'INSERT', "
        f"ARRAY[pg_catalog.jsonb_build_object('v', {big})], NULL); RETURN NULL; END $f$",
        "CREATE TRIGGER stuff BEFORE INSERT ON src FOR EACH ROW EXECUTE FUNCTION stuff()",
    ):
        assert (await sql(api, key, pid, q))["success"], q
    body = await sql(api, key, pid, "INSERT INTO src SELECT 'x' FROM generate_series(1, 8)")
    stored = await control_db.fetchval(
        "SELECT coalesce(sum(pg_column_size(record)), 0) FROM fluxbase.events WHERE project_id = $1", pid
    )
    assert stored <= cap, (stored, cap, body)


# -- 4. other requests' statement texts through the connection's prepared statements -----------------

PAD = "x" * 16_000  # past asyncpg's max_cacheable_statement_size: sent unnamed, cached nowhere


async def test_key_cannot_read_other_requests_statements_via_explain_execute(api: Api, project: Any) -> None:
    pid = project.id
    victim = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    mallory = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    marker = f"victim-secret-{secrets.token_hex(4)}"
    # The victim's requests, spread over the pool's connections.
    await asyncio.gather(*(sql(api, victim, pid, f"SELECT '{marker}' AS s") for _ in range(8)))
    leaks: list[str] = []
    refused: list[str] = []

    async def probe(n: int) -> None:
        # Padded: the probe itself is not prepared by name, so it neither moves the counter nor
        # evicts the victim's statement from the connection's cache.
        body = await sql(api, mallory, pid, f"EXPLAIN (VERBOSE) EXECUTE __asyncpg_stmt_{n:x}__ -- {PAD}")
        if marker in str(body):
            leaks.append(str(body))
        elif not body.get("success") and "not allowed" in str(body):
            refused.append(str(body))  # the classifier's refusal, not PostgreSQL's lookup

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 45
    for base in range(1, 1_000_000, 64):
        await asyncio.gather(*(probe(n) for n in range(base, base + 64)))
        if leaks or refused or loop.time() > deadline:
            break
    assert not leaks, leaks[0]
    assert refused, "EXPLAIN EXECUTE of a session prepared statement should be refused"


async def test_end_user_explain_execute_is_refused(api: Api, project: Any) -> None:
    """End users share their own pool: the same EXPLAIN EXECUTE must be refused for them."""
    pid = project.id
    key = await browser_key(api, project)
    _a, mallory = await end_user(api, pid)
    for q in (
        "EXPLAIN (VERBOSE) EXECUTE __asyncpg_stmt_1__",
        "CREATE TEMP TABLE stolen AS EXECUTE __asyncpg_stmt_1__",
    ):
        body = await sql(api, key, pid, q, mallory)
        assert "not allowed" in str(body), (q, body)


async def test_long_end_user_statement_runs_or_fails_never_silently_skipped(api: Api, project: Any) -> None:
    pid = project.id
    await messages_table(api, project)
    key = await browser_key(api, project)
    _uid, tok = await end_user(api, pid)
    body = await sql(api, key, pid, f"INSERT INTO messages VALUES (auth.uid(), 'long') -- {PAD}", tok)
    count = await sql(api, project.admin_key, pid, "SELECT count(*) AS n FROM messages")
    assert not body.get("success") or count["result"]["rows"] == [{"n": 1}], (body, count)
