"""Storage confinement (issue 15, findings 3, 8 and part of 5) through the real API.

- A `requireUserAuth` key (the one that ships inside a browser app) without an end-user token
  reaches nothing but public files; with one, each bucket's end-user rules decide what that
  user may list, read, sign, upload, overwrite and delete (docs/storage-access.md).
- A presigned POST form is pinned to its size and dead once its upload is confirmed.
- A tenant holding what used to be the platform's storage advisory-lock key blocks nobody.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from fluxbase.config import S3Settings, load_settings
from fluxbase.errors import Conflict
from fluxbase.storage.rules import END_USER_RULES, end_user_allows, end_user_sql
from fluxbase.storage.s3 import ObjectStore
from fluxbase.storage.streaming import copy_object
from fluxbase.worker import housekeeping
from support import Api, assert_error, bearer
from test_storage import create_bucket, s3_get, s3_keys, sign, upload
from test_user_tokens import project_user_token

MANY = 1_000_000


@pytest.fixture(scope="session")
async def s3(stack, instance) -> AsyncIterator[ObjectStore]:
    store = ObjectStore(
        S3Settings(
            stack.s3_endpoint,
            stack.s3_access_key,
            stack.s3_secret_key,
            bucket=instance.env["FLUXBASE_S3_BUCKET"],
        )
    )
    await store.start()
    yield store
    await store.close()


def user(key: str, token: str | None = None) -> dict[str, str]:
    return {**bearer(key), **({"X-Fluxbase-User-Token": token} if token else {})}


async def browser_key(api: Api, project: Any, scope: str = "readwrite") -> str:
    return await api.new_key(
        project.owner_token, project.id, scope, rateLimitRequests=MANY, requireUserAuth=True
    )


async def list_files(api: Api, headers: dict[str, str], pid: str, bucket: str) -> httpx.Response:
    return await api.http.get(
        "/api/storage/files", params={"projectId": pid, "bucketId": bucket}, headers=headers
    )


async def delete_file(api: Api, headers: dict[str, str], pid: str, s3_key: str) -> httpx.Response:
    return await api.http.delete(
        "/api/storage/delete", params={"projectId": pid, "s3Key": s3_key}, headers=headers
    )


async def upload_as(
    api: Api,
    headers: dict[str, str],
    pid: str,
    bucket: str,
    name: str,
    data: bytes,
    *,
    file_first: bool = True,
    **extra: str,
) -> httpx.Response:
    key = headers["Authorization"].removeprefix("Bearer ")
    rest = {k: v for k, v in headers.items() if k != "Authorization"}
    return await upload(api, key, pid, bucket, name, data, headers=rest, file_first=file_first, **extra)


# -- finding 3: a browser key without an end-user token ------------------------------------------


@pytest.mark.parametrize("scope", ["readwrite", "admin"])
async def test_browser_key_without_user_token_reaches_no_private_file(
    api: Api, project, s3, scope: str
) -> None:
    pid, admin = project.id, project.admin_key
    await create_bucket(api, admin, pid, "private")
    pub = await create_bucket(api, admin, pid, "pub", isPublic=True)
    secret = (await upload(api, admin, pid, "private", "secret.txt", b"top secret")).json()["file"]
    shown = (await upload(api, admin, pid, "pub", "logo.txt", b"public bytes")).json()["file"]
    key = await browser_key(api, project, scope)
    h = user(key)

    assert_error(
        await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=h),
        401,
        "USER_TOKEN_REQUIRED",
    )
    assert_error(await list_files(api, h, pid, "private"), 401, "USER_TOKEN_REQUIRED")
    assert_error(await list_files(api, h, pid, "pub"), 401, "USER_TOKEN_REQUIRED")
    for extra in ({}, {"expiresIn": 7 * 24 * 3600}):
        assert_error(await sign(api, key, pid, secret["s3_key"], **extra), 401, "USER_TOKEN_REQUIRED")
    for first in (True, False):
        r = await upload(
            api, key, pid, "private", "secret.txt", b"overwritten", upsert="true", file_first=first
        )
        assert_error(r, 401, "USER_TOKEN_REQUIRED")
        r = await upload(api, key, pid, "private", "new.txt", b"new", file_first=first)
        assert_error(r, 401, "USER_TOKEN_REQUIRED")
    r = await api.http.post(
        "/api/storage/upload-url",
        json={"projectId": pid, "bucketId": "private", "name": "secret.txt", "upsert": True},
        headers=h,
    )
    assert_error(r, 401, "USER_TOKEN_REQUIRED")
    assert_error(await delete_file(api, h, pid, secret["s3_key"]), 401, "USER_TOKEN_REQUIRED")
    assert await s3_get(s3, secret["s3_key"]) == b"top secret"
    assert await s3_keys(s3, f"{pid}/") == sorted([secret["s3_key"], shown["s3_key"]])

    # Broadcast is an end-user surface (as over WebSocket): with a user token only.
    r = await api.http.post(
        "/api/realtime/broadcast", json={"projectId": pid, "event": "x", "payload": 1}, headers=h
    )
    assert r.status_code == 401, r.text
    # Managing the project is never a browser key's business, token or not.
    _, token = await project_user_token(api, pid)
    for headers in (h, user(key, token)):
        r = await api.http.post(
            "/api/storage/buckets", json={"projectId": pid, "name": "mine"}, headers=headers
        )
        assert r.status_code in (401, 403), r.text
        r = await api.http.post(
            f"/api/projects/{pid}/api-keys", json={"name": "escape", "scope": "read"}, headers=headers
        )
        assert r.status_code in (401, 403), r.text
        r = await api.http.patch(
            "/api/storage/buckets",
            json={"projectId": pid, "bucketId": "private", "isPublic": True},
            headers=headers,
        )
        assert r.status_code in (401, 403), r.text
        for path in (
            f"/api/projects/{pid}",
            f"/api/projects/{pid}/migrations",
            f"/api/projects/{pid}/quotas",
        ):
            r = await api.http.get(path, headers=headers)
            assert r.status_code in (401, 403), (path, r.text)

    # Public files stay public: no key at all.
    async with httpx.AsyncClient(base_url=api.base_url) as anon:
        got = await anon.get(f"/api/storage/public/{shown['s3_key']}")
        assert got.status_code == 200 and got.content == b"public bytes"
    assert pub["isPublic"] is True


async def test_browser_key_without_user_token_on_records_and_batch(api: Api, project) -> None:
    pid = project.id
    r = await api.sql(project.admin_key, pid, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    assert r.json()["success"], r.text
    assert (await api.sql(project.admin_key, pid, "INSERT INTO notes VALUES (1, 'x')")).json()["success"]
    key = await browser_key(api, project, "admin")
    records = f"/api/projects/{pid}/tables/notes/records"
    h = user(key)
    assert_error(await api.http.get(records, headers=h), 401, "USER_TOKEN_REQUIRED")
    assert_error(await api.http.get(records + "/1", headers=h), 401, "USER_TOKEN_REQUIRED")
    assert_error(
        await api.http.post(records, json={"id": 2, "body": "y"}, headers=h), 401, "USER_TOKEN_REQUIRED"
    )
    assert_error(
        await api.http.patch(records + "/1", json={"body": "z"}, headers=h), 401, "USER_TOKEN_REQUIRED"
    )
    assert_error(await api.http.delete(records + "/1", headers=h), 401, "USER_TOKEN_REQUIRED")
    batch = {"projectId": pid, "statements": [{"query": "DELETE FROM notes"}]}
    assert_error(await api.http.post("/api/execute-batch", json=batch, headers=h), 401, "USER_TOKEN_REQUIRED")
    got = await api.sql(project.admin_key, pid, "SELECT id, body FROM notes")
    assert got.json()["result"]["rows"] == [{"id": 1, "body": "x"}]


# -- with a user token: per-bucket end-user rules ---------------------------------------------------


async def test_end_user_rules_owner_and_user_folder(api: Api, project, s3, control_db) -> None:
    pid, admin = project.id, project.admin_key
    key = await browser_key(api, project)
    alice, a_tok = await project_user_token(api, pid)
    bob, b_tok = await project_user_token(api, pid)
    a, b = user(key, a_tok), user(key, b_tok)
    owner_rules = {
        "list": "owner",
        "read": "owner",
        "insert": "authenticated",
        "update": "owner",
        "delete": "owner",
    }
    docs = await create_bucket(api, admin, pid, "docs", endUserAccess=owner_rules)
    assert docs["endUserAccess"] == owner_rules
    folder_rules = dict.fromkeys(owner_rules, "userFolder")
    await create_bucket(api, admin, pid, "home", endUserAccess=folder_rules)
    locked = await create_bucket(api, admin, pid, "locked")
    assert set(locked["endUserAccess"].values()) == {"none"}  # private by default
    by_server = (await upload(api, admin, pid, "locked", "server.txt", b"server only")).json()["file"]

    # owner: what Alice uploads is hers alone.
    r = await upload_as(api, a, pid, "docs", "a.txt", b"alice's")
    assert r.status_code == 201, r.text
    a_file = r.json()["file"]
    assert (
        await control_db.fetchval("SELECT owner_uid FROM fluxbase.objects WHERE id = $1::uuid", a_file["id"])
        == alice
    )
    assert [f["name"] for f in (await list_files(api, a, pid, "docs")).json()["files"]] == ["a.txt"]
    assert (await list_files(api, b, pid, "docs")).json()["files"] == []
    assert (
        await api.http.get(
            "/api/storage/url", params={"projectId": pid, "s3Key": a_file["s3_key"]}, headers=a
        )
    ).status_code == 200
    assert_error(
        await api.http.get(
            "/api/storage/url", params={"projectId": pid, "s3Key": a_file["s3_key"]}, headers=b
        ),
        404,
        "NOT_FOUND",
    )
    assert_error(
        await upload_as(api, b, pid, "docs", "a.txt", b"bob was here", upsert="true", file_first=False),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    r = await api.http.post(
        "/api/storage/upload-url",
        json={"projectId": pid, "bucketId": "docs", "name": "a.txt", "upsert": True, "size": 3},
        headers=b,
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(await delete_file(api, b, pid, a_file["s3_key"]), 404, "NOT_FOUND")
    assert await s3_get(s3, a_file["s3_key"]) == b"alice's"
    assert (await upload_as(api, a, pid, "docs", "a.txt", b"alice v2", upsert="true")).status_code == 201
    assert await s3_get(s3, a_file["s3_key"]) == b"alice v2"
    # A file a server put there has no owner: no end user reaches it under 'owner'.
    srv = (await upload(api, admin, pid, "docs", "srv.txt", b"srv")).json()["file"]
    assert_error(
        await api.http.get("/api/storage/url", params={"projectId": pid, "s3Key": srv["s3_key"]}, headers=a),
        404,
        "NOT_FOUND",
    )

    # userFolder: the first path segment must be the user's id.
    assert (await upload_as(api, a, pid, "home", f"{alice}/notes.txt", b"mine")).status_code == 201
    assert_error(
        await upload_as(api, a, pid, "home", f"{bob}/notes.txt", b"forged", file_first=False),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await upload_as(api, a, pid, "home", "shared.txt", b"top level"), 403, "INSUFFICIENT_PERMISSIONS"
    )
    assert (await upload_as(api, b, pid, "home", f"{bob}/notes.txt", b"bob's")).status_code == 201
    assert [f["name"] for f in (await list_files(api, a, pid, "home")).json()["files"]] == [
        f"{alice}/notes.txt"
    ]
    bob_file = (await list_files(api, user(admin), pid, "home")).json()["files"]
    bob_s3 = next(f["s3_key"] for f in bob_file if f["name"].startswith(bob))
    assert_error(await delete_file(api, a, pid, bob_s3), 404, "NOT_FOUND")
    assert await s3_get(s3, bob_s3) == b"bob's"

    # none (the default): nothing for end users, the server's files included.
    assert_error(await list_files(api, a, pid, "locked"), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(await upload_as(api, a, pid, "locked", "x.txt", b"x"), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(
        await api.http.get(
            "/api/storage/url", params={"projectId": pid, "s3Key": by_server["s3_key"]}, headers=a
        ),
        404,
        "NOT_FOUND",
    )
    # The bucket list shows an end user only the buckets open to them, with their own counts.
    listed = (await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=a)).json()
    assert {x["name"]: x["fileCount"] for x in listed["buckets"]} == {"docs": 1, "home": 1}
    # Alice may delete her own file.
    r = await delete_file(api, a, pid, a_file["s3_key"])
    assert r.status_code == 200 and r.json()["deleted"] == [a_file["s3_key"]], r.text
    # An invalid token is refused outright.
    assert_error(await list_files(api, user(key, "not-a-jwt"), pid, "docs"), 401, "INVALID_USER_TOKEN")
    # A plain (server) key keeps seeing everything.
    assert len((await list_files(api, user(admin), pid, "docs")).json()["files"]) == 1


async def test_bucket_rules_are_validated(api: Api, project) -> None:
    pid, admin = project.id, project.admin_key
    for bad in ({"read": "everyone"}, {"write": "owner"}, {"read": 1}):
        r = await api.http.post(
            "/api/storage/buckets",
            json={"projectId": pid, "name": "b", "endUserAccess": bad},
            headers=bearer(admin),
        )
        assert_error(r, 400, "VALIDATION_ERROR")
    await create_bucket(api, admin, pid, "b", endUserAccess={"read": "authenticated"})
    r = await api.http.patch(
        "/api/storage/buckets",
        json={"projectId": pid, "bucketId": "b", "endUserAccess": {"list": "authenticated"}},
        headers=bearer(admin),
    )
    assert r.status_code == 200, r.text
    rules = r.json()["bucket"]["endUserAccess"]
    assert rules == {
        "list": "authenticated",
        "read": "authenticated",
        "insert": "none",
        "update": "none",
        "delete": "none",
    }


# -- finding 8: presigned POST forms ------------------------------------------------------------


async def test_presigned_post_is_dead_once_confirmed(api: Api, project, s3, control_db, instance) -> None:
    pid, admin = project.id, project.admin_key
    bucket = await create_bucket(api, admin, pid, "b1")
    final = f"{pid}/{bucket['id']}/p.bin"

    async def grant(**extra: Any) -> dict[str, Any]:
        r = await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": pid, "bucketId": "b1", "name": "p.bin", **extra},
            headers=bearer(admin),
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def post(form: dict[str, Any], data: bytes) -> int:
        async with httpx.AsyncClient() as plain:
            r = await plain.post(
                form["url"], data=form["fields"], files={"file": ("p.bin", data, "application/octet-stream")}
            )
            return r.status_code

    for declared in (None, 4):
        extra = {"size": declared} if declared is not None else {}
        form = await grant(upsert=True, **extra)
        assert await post(form, b"four") in (200, 201, 204)
        r = await api.http.post(
            "/api/storage/upload-url/confirm",
            json={"projectId": pid, "fileId": form["file"]["id"]},
            headers=bearer(admin),
        )
        assert r.status_code == 200 and r.json()["file"]["size"] == 4, r.text
        # The same form again, with more bytes (refused by S3 if the size was declared).
        status = await post(form, b"x" * 5000)
        if declared is not None:
            assert status == 400
        assert await s3_get(s3, final) == b"four"
        again = await api.http.post(
            "/api/storage/upload-url/confirm",
            json={"projectId": pid, "fileId": form["file"]["id"]},
            headers=bearer(admin),
        )
        assert again.status_code == 200 and again.json()["file"]["size"] == 4
        row = await control_db.fetchrow(
            "SELECT size, pending_size FROM fluxbase.objects WHERE s3_key = $1", final
        )
        assert row["size"] == 4 and row["pending_size"] is None
        signed = (await sign(api, admin, pid, final)).json()["url"]
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(signed)).content == b"four"
    buckets = (
        await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(admin))
    ).json()
    assert buckets["limits"]["usedBytes"] == 4
    # Whatever a dead form wrote is removed by housekeeping; the file stays.
    settings = load_settings(instance.env)
    settings = msgspec.structs.replace(
        settings, storage=msgspec.structs.replace(settings.storage, orphan_grace_s=0)
    )
    await housekeeping(control_db, settings, s3)
    assert [k for k in await s3_keys(s3, "_") if pid in k or "presigned" in k] == []
    assert await s3_keys(s3, f"{pid}/") == [final]
    assert await s3_get(s3, final) == b"four"


# -- finding 5 (part): platform locks out of tenant reach ---------------------------------------


async def test_tenant_advisory_lock_does_not_block_uploads(api: Api, project, control_db) -> None:
    victim, admin = project.id, project.admin_key
    await create_bucket(api, admin, victim, "b1")
    # Another tenant takes the key the platform used for the victim's storage quota lock.
    other = await api.new_project(project.owner_token, "attacker")
    attacker = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    hold_s = 8
    query = (
        f"SELECT pg_advisory_xact_lock(hashtextextended('fluxbase.storage:{victim}', 0)), pg_sleep({hold_s})"
    )
    holder = asyncio.create_task(api.sql(attacker, other, query))

    async def lock_held() -> bool:
        n = await control_db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(n)

    deadline = time.monotonic() + 10
    while not await lock_held():
        assert time.monotonic() < deadline, "the tenant never got its lock"
        await asyncio.sleep(0.05)
    try:
        r = await upload(api, admin, victim, "b1", "x.txt", b"not blocked")
        assert r.status_code == 201, r.text
        grant = await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": victim, "bucketId": "b1", "name": "y.bin", "size": 10},
            headers=bearer(admin),
        )
        assert grant.status_code == 201, grant.text
        # Both finished while the tenant still holds its lock: nothing waited on it.
        assert await lock_held()
    finally:
        done = await holder
    assert done.json()["success"], done.text


async def test_control_pool_waits_time_out(spawn, stack) -> None:
    """A control-plane lock held elsewhere makes an upload fail fast with 503, not hang."""
    async with spawn(FLUXBASE_DATABASE_LOCK_TIMEOUT_MS="500") as inst:
        api = Api(inst.server.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=MANY)
            await create_bucket(api, key, pid, "b1")
            db = await asyncpg.connect(stack.database_url(inst.dbname))
            try:
                tx = db.transaction()
                await tx.start()
                await db.execute("SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR UPDATE", pid)
                started = time.monotonic()
                r = await upload(api, key, pid, "b1", "x.txt", b"x")
                assert_error(r, 503, "DATABASE_CONNECTION_ERROR")
                assert time.monotonic() - started < 10
                await tx.rollback()
            finally:
                await db.close()
            assert (await upload(api, key, pid, "b1", "x.txt", b"x")).status_code == 201
        finally:
            await api.close()


async def test_confirm_copies_only_the_version_it_measured(s3) -> None:
    """The copy behind confirm is conditional on the measured ETag: a form used again between
    measuring and copying makes confirm fail (409) instead of registering other bytes."""
    src, dst = f"_presigned/test/{uuid.uuid4()}", f"_presigned/test/{uuid.uuid4()}"
    await s3.client.put_object(Bucket=s3.bucket, Key=src, Body=b"measured")
    etag = (await s3.client.head_object(Bucket=s3.bucket, Key=src))["ETag"]
    await s3.client.put_object(Bucket=s3.bucket, Key=src, Body=b"swapped!")
    with pytest.raises(Conflict):
        await copy_object(s3, src, dst, 8, "application/octet-stream", if_match=etag)
    assert dst not in await s3_keys(s3, "_presigned/test/")
    fresh = (await s3.client.head_object(Bucket=s3.bucket, Key=src))["ETag"]
    await copy_object(s3, src, dst, 8, "application/octet-stream", if_match=fresh)
    assert await s3_get(s3, dst) == b"swapped!"
    await s3.client.delete_objects(Bucket=s3.bucket, Delete={"Objects": [{"Key": src}, {"Key": dst}]})


async def test_rule_predicate_in_python_and_sql_agree(control_db) -> None:
    """storage/rules.py states each rule twice (single files in Python, listings and deletes in
    SQL); both must give the same answer, tricky ids and names included."""
    uids = ["alice", "al", "a/b", "", "ä", "alice/"]
    names = ["alice/x", "alice", "al/x", "alice/x/y", "a/b/c", "a/x", "/x", "ä/f", "alicex/y", "x"]
    owners = [None, "alice", "al", "a/b", ""]
    cases = [(r, u, n, o) for r in END_USER_RULES for u in uids for n in names for o in owners]
    got = await control_db.fetch(
        f"""SELECT {end_user_sql("f.rule", "f.uid", alias="f")} AS ok
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                 WITH ORDINALITY AS f(rule, uid, name, owner_uid, i)
            ORDER BY f.i""",
        [c[0] for c in cases],
        [c[1] for c in cases],
        [c[2] for c in cases],
        [c[3] for c in cases],
    )
    python = [end_user_allows(*c) for c in cases]
    assert [bool(r["ok"]) for r in got] == python
    assert python.count(True) > 50 and python.count(False) > 50
