"""Hostile review 18: the cold5 merge (a new tenant session's first request sends no full reset,
the reset, read-only and end-user steps parsed when a request first needs them) and the sqlspeed5
merge (the rate lease's token and the cached key without a coroutine, authorize's answer kept per
cached key as a grant), attacked through the real API on the real stack with the source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix. The database fixture (`control_db`) only observes, and ends the project's
backends so that the next request meets a new session (as a dropped connection does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import types
from typing import Any

import asyncpg

from support import Api, assert_error, bearer
from test_attack_review1 import MANY, browser_key, end_user
from test_attack_review15 import _drop_backends, _sql

# -- helpers ------------------------------------------------------------------------------------

# Everything a request can leave in its session that the reset steps past CLOSE ALL clear: a
# setting (and the search path), a session advisory lock, a temp table, a sequence's currval, a
# LISTEN (whose UNLISTEN * takes effect when the next request's implicit transaction commits: the
# probe, inside that transaction, still lists the channel, on main as well, so it is not probed).
# SECURITY DEFINER so that every scope's role may call it.
LEAVE = """CREATE FUNCTION leave(tag text) RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  PERFORM pg_catalog.nextval('r18_seq');
  PERFORM pg_catalog.set_config('fx.leak', tag, false);
  PERFORM pg_catalog.set_config(
    'search_path', 'pg_temp, ' || pg_catalog.current_setting('search_path'), false);
  CREATE TEMP TABLE IF NOT EXISTS leaked (v text);
  PERFORM pg_catalog.pg_advisory_lock(4242);
  EXECUTE 'LISTEN r18';
  RETURN pg_catalog.pg_backend_pid();
END $$"""
PROBE = """CREATE FUNCTION probe() RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE c bigint;
BEGIN
  BEGIN c := pg_catalog.currval('r18_seq'); EXCEPTION WHEN others THEN c := NULL; END;
  RETURN pg_catalog.jsonb_build_object(
    'pid', pg_catalog.pg_backend_pid(),
    'leak', coalesce(pg_catalog.current_setting('fx.leak', true), ''),
    'path', pg_catalog.current_setting('search_path'),
    'locks', (SELECT count(*) FROM pg_catalog.pg_locks l
              WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid()),
    'temp', pg_catalog.to_regclass('pg_temp.leaked') IS NOT NULL,
    'listens', (SELECT count(*) FROM pg_catalog.pg_listening_channels()),
    'currval', c);
END $$"""
# A write the classifier reads as a SELECT: only the session's read-only step stops it.
WRITE_FN = """CREATE FUNCTION sneak(v int) RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN INSERT INTO w VALUES (v); RETURN v; END $$"""


async def _ok(api: Api, key: str, pid: str, query: str, token: str | None = None) -> dict[str, Any]:
    r = await _sql(api, key, pid, query, token=token)
    assert r.status_code == 200 and r.json()["success"], (query, r.text)
    return dict(r.json())


async def _setup(api: Api, project: Any) -> None:
    for q in (
        "CREATE SEQUENCE r18_seq",
        "GRANT USAGE ON SEQUENCE r18_seq TO PUBLIC",
        "CREATE TABLE w (v int)",
        LEAVE,
        PROBE,
        WRITE_FN,
    ):
        await _ok(api, project.admin_key, project.id, q)


async def _probe(api: Api, key: str, pid: str, token: str | None = None) -> dict[str, Any]:
    res = await _ok(api, key, pid, "SELECT probe() AS p", token=token)
    p = res["result"]["rows"][0]["p"]
    return dict(json.loads(p) if isinstance(p, str) else p)


def _clean(p: dict[str, Any]) -> None:
    assert p["leak"] == "" and p["locks"] == 0 and p["currval"] is None and not p["temp"], p
    assert not p["path"].startswith("pg_temp"), p


def _refused_write(r: Any) -> None:
    assert not r.json()["success"], r.text
    assert "25006" in r.text or "PROJECT_READ_ONLY" in r.text, r.text


async def _count(api: Api, key: str, pid: str) -> int:
    res = await _ok(api, key, pid, "SELECT count(*)::int AS n FROM w")
    return int(res["result"]["rows"][0]["n"])


# -- 1. cold5: the first request of a new session sends no full reset -----------------------------


async def test_state_a_new_sessions_first_request_leaves_is_gone_for_the_next_key(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Mallory's request is the first on a new session (its backends just ended): it leaves a
    setting, a search path, an advisory lock, a currval and a LISTEN. The next request on that
    same session, another key's, finds none of it; so does the one after a batch (the
    transaction path) left the same state, and after a failed first request."""
    pid, owner = project.id, project.owner_token
    await _setup(api, project)
    mallory = await api.new_key(owner, pid, "admin", rateLimitRequests=MANY)
    victim = await api.new_key(owner, pid, "admin", rateLimitRequests=MANY)
    same = 0
    for _ in range(2):
        await _drop_backends(control_db, pid)
        left = await _ok(api, mallory, pid, "SELECT leave('mallory') AS pid")
        p = await _probe(api, victim, pid)
        _clean(p)
        same += p["pid"] == left["result"]["rows"][0]["pid"]
        # A first request that fails after its prefix ran (the statement raises).
        await _drop_backends(control_db, pid)
        r = await _sql(api, mallory, pid, "SELECT leave('x') / 0")
        assert not r.json()["success"], r.text
        _clean(await _probe(api, victim, pid))
        # The transaction path first, the one-round-trip path next.
        await _drop_backends(control_db, pid)
        r = await api.http.post(
            "/api/execute-batch",
            json={"projectId": pid, "statements": [{"query": "SELECT leave('batch') AS pid"}]},
            headers=bearer(mallory),
        )
        assert r.status_code == 200 and r.json()["success"], r.text
        _clean(await _probe(api, victim, pid))
    assert same >= 1, same  # the probe met mallory's very session (else this proves nothing)


async def test_state_a_migration_leaves_on_a_new_session_is_gone_for_the_next_request(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Another path first (a migration, on the admin pool's new session), the one-round-trip
    path next: the migration's session-level state is gone for the next key's request."""
    pid, owner = project.id, project.owner_token
    await _setup(api, project)
    victim = await api.new_key(owner, pid, "admin", rateLimitRequests=MANY)
    for n in range(2):
        await _drop_backends(control_db, pid)
        r = await api.http.post(
            f"/api/projects/{pid}/migrations",
            json={"name": f"r18_{n}", "sql": "SELECT leave('migration')"},
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 200, r.text
        _clean(await _probe(api, victim, pid))


async def test_end_user_state_on_a_new_end_user_session_is_gone_for_the_next_end_user(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """A user_session request as a new end-user session's first request: alice (through the
    browser key) leaves state, bob's next request on that session sees none of it; alice's
    token stops working on that session the moment she logs out."""
    pid = project.id
    await _setup(api, project)
    key = await browser_key(api, project)
    _alice, a_tok = await end_user(api, pid)
    bob, b_tok = await end_user(api, pid)
    same = 0
    for _ in range(2):
        await _drop_backends(control_db, pid)
        left = await _ok(api, key, pid, "SELECT leave('alice') AS pid", token=a_tok)
        p = await _probe(api, key, pid, token=b_tok)
        _clean(p)
        same += p["pid"] == left["result"]["rows"][0]["pid"]
    assert same >= 1, same
    r = await api.http.post(f"/api/projects/{pid}/auth/logout", headers=bearer(a_tok))
    assert r.status_code == 200, r.text
    for _ in range(3):
        r = await _sql(api, key, pid, "SELECT 1 AS one", token=a_tok)
        assert r.status_code == 401, r.text
    assert (await _ok(api, key, pid, "SELECT 1 AS one", token=b_tok))["result"]["rows"] == [{"one": 1}]
    # bob disabled by the project's owner: refused on the session he just used.
    r = await api.http.post(
        f"/api/projects/{pid}/auth/users/{bob}/disable", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    r = await _sql(api, key, pid, "SELECT 1 AS one", token=b_tok)
    assert r.status_code == 401, r.text


async def test_read_only_holds_on_a_session_that_served_writes_before(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The read-only step is parsed lazily: a session whose requests never needed it (writes of
    an admin key) must still apply it to the first request after the project is made
    read-only; a read key's first request on a new session is read-only too, and stays so after
    that first request failed while encoding its parameters."""
    pid, key, owner = project.id, project.admin_key, project.owner_token
    await _setup(api, project)
    reader = await api.new_key(owner, pid, "read", rateLimitRequests=MANY)
    for n in range(2):
        await _drop_backends(control_db, pid)
        # A read key's first request on its new session (a write the classifier cannot see).
        r = await _sql(api, reader, pid, "SELECT sneak(100) AS v")
        _refused_write(r)
        await _drop_backends(control_db, pid)
        r = await _sql(api, reader, pid, "SELECT $1::int AS v", params=["abc"])
        assert not r.json()["success"], r.text
        r = await _sql(api, reader, pid, "SELECT sneak(101) AS v")
        _refused_write(r)
        # An admin session that served writes, then the project made read-only.
        await _drop_backends(control_db, pid)
        await _ok(api, key, pid, f"SELECT sneak({n}) AS v")
        r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": True}, headers=bearer(owner))
        assert r.status_code == 200, r.text
        r = await _sql(api, key, pid, "SELECT sneak(200) AS v")
        _refused_write(r)
        r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": False}, headers=bearer(owner))
        assert r.status_code == 200, r.text
    assert await _count(api, key, pid) == 2


# -- 2. sqlspeed5: authorize's answer kept per cached key ------------------------------------------


async def _warm(api: Api, key: str, pid: str, token: str | None = None, **headers: str) -> None:
    """Enough requests that the key is cached and its grant made and used."""
    for _ in range(3):
        h = {**bearer(key), **headers}
        if token is not None:
            h["X-Fluxbase-User-Token"] = token
        r = await api.http.post(
            "/api/execute-sql", json={"projectId": pid, "query": "SELECT 1 AS one"}, headers=h
        )
        assert r.status_code == 200, r.text


async def test_a_revoked_key_is_refused_at_once_though_its_grant_was_warm(api: Api, project: Any) -> None:
    pid, owner = project.id, project.owner_token
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "doomed", "scope": "admin", "rateLimitRequests": MANY},
        headers=bearer(owner),
    )
    assert r.status_code == 201, r.text
    raw, key_id = r.json()["key"], r.json()["apiKey"]["id"]
    await _warm(api, raw, pid)
    r = await api.http.delete(f"/api/projects/{pid}/api-keys/{key_id}", headers=bearer(owner))
    assert r.status_code == 200, r.text
    answers = await asyncio.gather(*(_sql(api, raw, pid, "SELECT 1 AS one") for _ in range(8)))
    assert all(a.status_code == 401 for a in answers), [a.text for a in answers if a.status_code != 401][:2]
    r = await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": "SELECT 1"}]},
        headers=bearer(raw),
    )
    assert r.status_code == 401, r.text
    # A rotated key: its old secret is refused at once, though its grant was warm.
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "rotated", "scope": "admin", "rateLimitRequests": MANY},
        headers=bearer(owner),
    )
    assert r.status_code == 201, r.text
    old, key_id = r.json()["key"], r.json()["apiKey"]["id"]
    await _warm(api, old, pid)
    r = await api.http.post(f"/api/projects/{pid}/api-keys/{key_id}/rotate", headers=bearer(owner))
    assert r.status_code == 200, r.text
    new = r.json()["key"]
    answers = await asyncio.gather(*(_sql(api, old, pid, "SELECT 1 AS one") for _ in range(4)))
    assert all(a.status_code == 401 for a in answers), [a.text for a in answers if a.status_code != 401][:2]
    await _ok(api, new, pid, "SELECT 1 AS one")


async def test_a_suspended_project_is_refused_at_once_and_resumes_at_once(
    api: Api, project: Any, instance_admin: dict[str, Any]
) -> None:
    pid, key = project.id, project.admin_key
    await _warm(api, key, pid)
    admin = bearer(instance_admin["token"])
    r = await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=admin)
    assert r.status_code == 200, r.text
    for _ in range(3):
        r = await _sql(api, key, pid, "SELECT 1 AS one")
        assert r.status_code in (401, 403, 423), r.text
    r = await api.http.post(f"/api/admin/projects/{pid}/resume", headers=admin)
    assert r.status_code == 200, r.text
    await _ok(api, key, pid, "SELECT 1 AS one")


async def test_a_warm_grant_still_checks_origin_project_and_end_user_token(api: Api, project: Any) -> None:
    """The grant is found by the Authorization header alone: the origin, the project asked for
    and the end-user token of each request must still be checked."""
    pid, owner = project.id, project.owner_token
    locked = await api.new_key(
        owner, pid, "admin", allowedOrigins=["https://app.example.com"], rateLimitRequests=MANY
    )
    await _warm(api, locked, pid, origin="https://app.example.com")
    for origin in (None, "https://evil.example.com", "https://APP.example.com"):
        h = {**bearer(locked)} | ({"origin": origin} if origin else {})
        r = await api.http.post("/api/execute-sql", json={"projectId": pid, "query": "SELECT 1"}, headers=h)
        assert r.status_code == 403, (origin, r.text)
    # Another project of the same owner: the warm key of this one does not reach it.
    other = await api.new_project(owner, "other")
    await _warm(api, project.admin_key, pid)
    r = await _sql(api, project.admin_key, other, "SELECT 1 AS one")
    assert r.status_code in (403, 404), r.text
    # A requireUserAuth key warm with a token is refused without one, and with a made-up one.
    key = await browser_key(api, project)
    _uid, tok = await end_user(api, pid)
    await _warm(api, key, pid, token=tok)
    assert_error(await _sql(api, key, pid, "SELECT 1 AS one"), 401, "USER_TOKEN_REQUIRED")
    r = await _sql(api, key, pid, "SELECT 1 AS one", token=tok[:-4] + "AAAA")
    assert r.status_code == 401, r.text


async def test_a_rate_limit_holds_under_a_burst_on_a_warm_grant(api: Api, project: Any) -> None:
    """Five requests a minute: after the grant and the lease are warm (two requests), a burst of
    twenty concurrent ones gets three more at most, and a second key has its own count."""
    pid, owner = project.id, project.owner_token
    limited = await api.new_key(owner, pid, "admin", rateLimitRequests=5, rateLimitWindowSeconds=60)
    second = await api.new_key(owner, pid, "admin", rateLimitRequests=5, rateLimitWindowSeconds=60)
    for _ in range(2):
        await _ok(api, limited, pid, "SELECT 1 AS one")
    answers = await asyncio.gather(*(_sql(api, limited, pid, "SELECT 1 AS one") for _ in range(20)))
    codes = [a.status_code for a in answers]
    assert codes.count(200) <= 3 and all(c in (200, 429) for c in codes), codes
    answers = await asyncio.gather(*(_sql(api, second, pid, "SELECT 1 AS one") for _ in range(8)))
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 5 and codes.count(429) == 3, codes


# -- 3. sqlspeed5: the grants' table, keyed by the whole Authorization header ----------------------


def _rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants (KiB)."""
    procs = [p for p in os.listdir("/proc") if p.isdigit()]
    parents: dict[int, int] = {}
    for p in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{p}/stat") as f:
                parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {c for c, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for p in tree:
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total


async def test_a_public_keys_callers_cannot_make_the_api_keep_their_headers(spawn: Any) -> None:
    """A requireUserAuth key ships in browser apps: anyone has it. Without an end-user token every
    request is refused (401), yet each distinct Authorization header of a known key must not stay
    in the API's memory: `Bearer` + n spaces + the key is the same key for every n, and a header
    may be 256 KiB long. 400 such requests (100 MiB of headers) must not grow the API by 40 MiB.
    (Review 18: seen failing as a strict xfail on sqlspeed5's grants keyed by the whole header.)"""
    async with spawn() as inst:
        api = Api(inst.url)
        try:
            _owner, token = await api.new_user()
            pid = await api.new_project(token)
            key = await browser_key(api, types.SimpleNamespace(id=pid, owner_token=token))
            body = {"projectId": pid, "query": "SELECT 1"}
            r = await api.http.post("/api/execute-sql", json=body, headers=bearer(key))
            assert_error(r, 401, "USER_TOKEN_REQUIRED")
            await asyncio.sleep(0.5)
            before = _rss_kib(inst.server.proc.pid)
            pad = 250 * 1024

            async def one(n: int) -> int:
                h = {"Authorization": "Bearer" + " " * (pad - n) + key}
                r = await api.http.post("/api/execute-sql", json=body, headers=h)
                return r.status_code

            for start in range(0, 400, 8):
                codes = await asyncio.gather(*(one(n) for n in range(start, start + 8)))
                assert all(c == 401 for c in codes), codes
            await asyncio.sleep(0.5)
            grown_mib = (_rss_kib(inst.server.proc.pid) - before) / 1024
            assert grown_mib < 40, f"the API grew by {grown_mib:.0f} MiB"
        finally:
            await api.close()
