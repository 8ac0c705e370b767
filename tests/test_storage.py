"""Storage v2 through the real API against real PostgreSQL and a real SeaweedFS S3.

Bytes are checked in S3 itself (a second client with the test stack's credentials), rows in
the control plane, and presigned URLs with a plain HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest

from fluxbase.config import S3Settings, load_settings
from fluxbase.storage.s3 import ObjectStore
from fluxbase.worker import housekeeping
from support import Api, assert_clean, assert_error, bearer

MIB = 1024 * 1024
BOUNDARY = "fluxbase-test-7d1c0e"


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="session")
async def s3(stack, instance) -> AsyncIterator[ObjectStore]:
    """Direct access to the instance's S3 bucket, to check what is really stored."""
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


async def s3_keys(store: ObjectStore, prefix: str) -> list[str]:
    resp = await store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


async def s3_get(store: ObjectStore, key: str) -> bytes:
    resp = await store.client.get_object(Bucket=store.bucket, Key=key)
    async with resp["Body"] as body:
        data: bytes = await body.read()
    return data


async def multipart_uploads(store: ObjectStore, prefix: str = "") -> list[str]:
    resp = await store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
    return [u["Key"] for u in resp.get("Uploads", [])]


def form(
    parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = BOUNDARY
) -> tuple[bytes, str]:
    """A multipart/form-data body with parts in exactly the given order: (field, filename, type, data)."""
    out = bytearray()
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def fields(project_id: str, bucket: str, **extra: str) -> list[tuple[str, str | None, str | None, bytes]]:
    values = {"bucketId": bucket, "projectId": project_id, **extra}
    return [(k, None, None, v.encode()) for k, v in values.items()]


async def upload(
    api: Api,
    key: str,
    project_id: str,
    bucket: str,
    filename: str,
    data: bytes,
    ctype: str = "application/octet-stream",
    *,
    file_first: bool = True,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    **extra: str,
) -> httpx.Response:
    """POST /api/storage/upload; file_first=True is the reference doc's field order."""
    file_part = [("file", filename, ctype, data)]
    meta = fields(project_id, bucket, **extra)
    body, content_type = form(file_part + meta if file_first else meta + file_part)
    return await api.http.post(
        "/api/storage/upload",
        content=body,
        params=query or {},
        headers={**bearer(key), "Content-Type": content_type, **(headers or {})},
    )


async def run_shell(script: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", script, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def _reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


async def create_bucket(api: Api, key: str, project_id: str, name: str, **extra: Any) -> dict[str, Any]:
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": project_id, "name": name, **extra}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text
    bucket: dict[str, Any] = r.json()["bucket"]
    return bucket


async def sign(api: Api, key: str, project_id: str, s3_key: str, **extra: Any) -> httpx.Response:
    return await api.http.get(
        "/api/storage/url", params={"s3Key": s3_key, "projectId": project_id, **extra}, headers=bearer(key)
    )


async def object_rows(db: asyncpg.Pool, project_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM fluxbase.objects WHERE project_id = $1 ORDER BY name", project_id)


# ---------------------------------------------------------------------------------------------
# buckets


async def test_bucket_lifecycle_and_name_rules(api: Api, project, control_db) -> None:
    key, pid = project.admin_key, project.id
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": pid, "name": "profile-photos"}, headers=bearer(key)
    )
    assert r.status_code == 201
    bucket = r.json()["bucket"]
    assert r.json()["success"] is True and bucket["name"] == "profile-photos"
    assert bucket["isPublic"] is False  # private by default
    assert uuid.UUID(bucket["id"])
    assert_error(
        await api.http.post(
            "/api/storage/buckets", json={"projectId": pid, "name": "profile-photos"}, headers=bearer(key)
        ),
        409,
        "CONFLICT",
    )

    for bad in ("Profile", "with space", "", "a" * 64, "dots.not.ok", "émoji", str(uuid.uuid4())):
        body = assert_error(
            await api.http.post(
                "/api/storage/buckets", json={"projectId": pid, "name": bad}, headers=bearer(key)
            ),
            400,
            "VALIDATION_ERROR",
        )
        message = body["error"]["message"]
        assert (
            "lowercase letters, digits, hyphens and underscores" in message
            or "must not look like a UUID" in message
        ), message
    assert (
        await api.http.post(
            "/api/storage/buckets", json={"projectId": pid, "name": "a" * 63}, headers=bearer(key)
        )
    ).status_code == 201
    assert (
        await api.http.post(
            "/api/storage/buckets", json={"projectId": pid, "name": "x_y-9"}, headers=bearer(key)
        )
    ).status_code == 201

    # Rename by UUID, then by current name + newName; keys use the UUID, so files stay put.
    up = await upload(api, key, pid, "profile-photos", "a.txt", b"hello", "text/plain")
    assert up.status_code == 201, up.text
    r = await api.http.patch(
        "/api/storage/buckets",
        json={"projectId": pid, "bucketId": bucket["id"], "name": "avatars"},
        headers=bearer(key),
    )
    assert r.status_code == 200 and r.json()["bucket"]["name"] == "avatars"
    r = await api.http.patch(
        "/api/storage/buckets",
        json={"projectId": pid, "name": "avatars", "newName": "faces", "isPublic": True},
        headers=bearer(key),
    )
    assert r.status_code == 200 and r.json()["bucket"]["name"] == "faces" and r.json()["bucket"]["isPublic"]
    assert_error(
        await api.http.patch(
            "/api/storage/buckets",
            json={"projectId": pid, "bucketId": "faces", "name": "x_y-9"},
            headers=bearer(key),
        ),
        409,
        "CONFLICT",
    )
    assert_error(
        await api.http.patch(
            "/api/storage/buckets",
            json={"projectId": pid, "bucketId": "faces", "name": "Bad Name"},
            headers=bearer(key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    url = await sign(api, key, pid, up.json()["file"]["s3_key"])
    assert url.status_code == 200

    listing = await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(key))
    assert listing.status_code == 200
    got = {b["name"]: b for b in listing.json()["buckets"]}
    assert set(got) == {"faces", "a" * 63, "x_y-9"}
    assert got["faces"]["fileCount"] == 1 and got["faces"]["size"] == 5
    assert listing.json()["totalSize"] == 5
    assert listing.json()["limits"]["usedBytes"] == 5

    # Delete: must be empty (409 names the count), by name or UUID, query string or JSON body.
    body = assert_error(
        await api.http.request(
            "DELETE",
            "/api/storage/buckets",
            json={"projectId": pid, "bucketId": "faces"},
            headers=bearer(key),
        ),
        409,
        "CONFLICT",
    )
    assert "not empty" in body["error"]["message"]
    r = await api.http.delete(
        "/api/storage/delete",
        params={"projectId": pid, "s3Key": up.json()["file"]["s3_key"]},
        headers=bearer(key),
    )
    assert r.status_code == 200
    r = await api.http.delete(
        "/api/storage/buckets", params={"projectId": pid, "bucketId": bucket["id"]}, headers=bearer(key)
    )
    assert r.status_code == 200 and r.json()["bucket"]["name"] == "faces"
    assert_error(
        await api.http.delete(
            "/api/storage/buckets", params={"projectId": pid, "bucketId": "faces"}, headers=bearer(key)
        ),
        404,
        "NOT_FOUND",
    )
    assert await control_db.fetchval("SELECT count(*) FROM fluxbase.buckets WHERE project_id = $1", pid) == 2


# ---------------------------------------------------------------------------------------------
# uploads


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_doc_curl_example_works_as_written(api: Api, project, s3, tmp_path: Path, control_db) -> None:
    bucket = await create_bucket(api, project.admin_key, project.id, "profile-photos")
    avatar = tmp_path / "avatar.jpg"
    content = os.urandom(204800)
    avatar.write_bytes(content)
    # The reference doc's snippet, with only the host and the placeholders filled in.
    script = f'''curl -X POST "{api.base_url}/api/storage/upload" \\
  -H "Authorization: Bearer $FLUXBASE_API_KEY" \\
  -F "file=@avatar.jpg" \\
  -F "bucketId=profile-photos" \\
  -F "projectId={project.id}"'''
    env = {**os.environ, "FLUXBASE_API_KEY": project.admin_key}
    code, out, err = await run_shell(script, tmp_path, env)
    assert code == 0, err
    body = msgspec.json.decode(out)
    assert body["success"] is True
    file = body["file"]
    assert uuid.UUID(file["id"])
    assert file["name"] == "avatar.jpg"
    assert file["s3_key"] == f"{project.id}/{bucket['id']}/avatar.jpg"
    assert file["size"] == 204800
    assert file["contentType"] == "image/jpeg"  # curl's guess from the extension
    # The bytes really are in S3 under that key; nothing is left in staging.
    assert await s3_get(s3, file["s3_key"]) == content
    assert await s3_keys(s3, "_staging/") == []
    row = await control_db.fetchrow(
        "SELECT status, size, lease_id FROM fluxbase.objects WHERE id = $1", uuid.UUID(file["id"])
    )
    assert row["status"] == "ready" and row["size"] == 204800 and row["lease_id"] is None
    # Past 1 MiB curl sends "Expect: 100-continue" and waits for the server's go-ahead.
    big = os.urandom(3 * MIB)
    (tmp_path / "big.bin").write_bytes(big)
    code, out, err = await run_shell(script.replace("avatar.jpg", "big.bin") + " -v", tmp_path, env)
    assert code == 0, err
    assert "Expect: 100-continue" in err
    assert msgspec.json.decode(out)["file"]["size"] == 3 * MIB
    assert await s3_get(s3, f"{project.id}/{bucket['id']}/big.bin") == big


async def test_upload_field_orders_and_listing(api: Api, project, s3) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "docs")
    # Fields first (streams straight to the final key), bucketId as UUID.
    r = await upload(
        api,
        key,
        pid,
        bucket["id"],
        "report.pdf",
        b"%PDF-1.7 fields first",
        "application/pdf",
        file_first=False,
    )
    assert r.status_code == 201, r.text
    assert r.json()["file"]["s3_key"] == f"{pid}/{bucket['id']}/report.pdf"
    # Arguments in the query string too: the file streams straight to its key even when sent first...
    r = await upload(
        api,
        key,
        pid,
        "docs",
        "query.txt",
        b"via query",
        file_first=True,
        query={"projectId": pid, "bucketId": "docs"},
    )
    assert r.status_code == 201, r.text
    assert await s3_get(s3, f"{pid}/{bucket['id']}/query.txt") == b"via query"
    # ...so a name arriving after the file could no longer move it: a clear error, nothing stored.
    r = await upload(
        api,
        key,
        pid,
        "docs",
        "late.txt",
        b"x",
        file_first=True,
        query={"projectId": pid, "bucketId": "docs"},
        name="renamed.txt",
    )
    assert (
        "must not change or repeat after the file part"
        in assert_error(r, 400, "VALIDATION_ERROR")["error"]["message"]
    )
    # A name field before the file overrides the file name; folders and Unicode are fine.
    r = await upload(
        api, key, pid, "docs", "ignored.bin", b"q", file_first=False, name="2024/été/notes 1.txt"
    )
    assert r.status_code == 201, r.text
    assert r.json()["file"]["name"] == "2024/été/notes 1.txt"
    assert await s3_get(s3, f"{pid}/{bucket['id']}/2024/été/notes 1.txt") == b"q"
    for i in range(5):
        assert (
            await upload(api, key, pid, "docs", f"2024/img-{i}.png", bytes([i]) * (i + 1), "image/png")
        ).status_code == 201

    async def page(**params: Any) -> dict[str, Any]:
        r = await api.http.get(
            "/api/storage/files", params={"projectId": pid, "bucketId": "docs", **params}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    everything = await page()
    names = [f["name"] for f in everything["files"]]
    assert names == sorted(names) and len(names) == 8 and everything["nextCursor"] is None
    assert "late.txt" not in names and "renamed.txt" not in names
    assert {f["size"] for f in everything["files"] if f["name"] == "2024/img-3.png"} == {4}
    assert all(
        set(f) >= {"id", "name", "s3_key", "size", "contentType", "createdAt"} for f in everything["files"]
    )

    seen, cursor = [], None
    while True:
        body = await page(limit=2, prefix="2024/img-", **({"cursor": cursor} if cursor else {}))
        seen += [f["name"] for f in body["files"]]
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert seen == [f"2024/img-{i}.png" for i in range(5)]
    assert [f["name"] for f in (await page(prefix="2024/é"))["files"]] == ["2024/été/notes 1.txt"]
    assert_error(
        await api.http.get(
            "/api/storage/files",
            params={"projectId": pid, "bucketId": "docs", "cursor": "%%%"},
            headers=bearer(key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(
        await api.http.get(
            "/api/storage/files", params={"projectId": pid, "bucketId": "nope"}, headers=bearer(key)
        ),
        404,
        "NOT_FOUND",
    )


async def test_existing_name_conflicts_unless_upsert(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "b1")
    first = await upload(api, key, pid, "b1", "same.txt", b"one", "text/plain")
    assert first.status_code == 201
    body = assert_error(await upload(api, key, pid, "b1", "same.txt", b"two!", "text/plain"), 409, "CONFLICT")
    assert "upsert" in body["error"]["message"]
    assert await s3_get(s3, first.json()["file"]["s3_key"]) == b"one"  # the refused upload changed nothing
    again = await upload(api, key, pid, "b1", "same.txt", b"two!", "text/plain", upsert="true")
    assert again.status_code == 201, again.text
    assert again.json()["file"]["id"] == first.json()["file"]["id"] and again.json()["file"]["size"] == 4
    assert await s3_get(s3, first.json()["file"]["s3_key"]) == b"two!"
    header = await upload(
        api,
        key,
        pid,
        "b1",
        "same.txt",
        b"three",
        "text/plain",
        file_first=False,
        headers={"x-upsert": "true"},
    )
    assert header.status_code == 201 and header.json()["file"]["size"] == 5
    rows = await object_rows(control_db, pid)
    assert len(rows) == 1 and rows[0]["size"] == 5 and rows[0]["lease_id"] is None


async def test_malformed_uploads_are_refused_without_leftovers(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "b1")
    assert_error(
        await api.http.post("/api/storage/upload", json={"projectId": pid}, headers=bearer(key)),
        400,
        "VALIDATION_ERROR",
    )
    body, ctype = form(fields(pid, "b1"))
    r = await api.http.post(
        "/api/storage/upload", content=body, headers={**bearer(key), "Content-Type": ctype}
    )
    assert "no 'file' part" in assert_error(r, 400, "VALIDATION_ERROR")["error"]["message"]
    truncated, ctype = form([("file", "x.bin", None, b"x" * 1000), *fields(pid, "b1")])
    r = await api.http.post(
        "/api/storage/upload", content=truncated[:-40], headers={**bearer(key), "Content-Type": ctype}
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    two, ctype = form([("file", "a", None, b"a"), ("file", "b", None, b"b"), *fields(pid, "b1")])
    assert_error(
        await api.http.post(
            "/api/storage/upload", content=two, headers={**bearer(key), "Content-Type": ctype}
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(await upload(api, key, pid, "missing-bucket", "x.txt", b"x"), 404, "NOT_FOUND")
    assert_error(
        await upload(api, key, pid, "b1", "x.txt", b"x", file_first=False, upsert="maybe"),
        400,
        "VALIDATION_ERROR",
    )
    no_project, ctype = form([("file", "x.txt", None, b"x"), ("bucketId", None, None, b"b1")])
    assert_error(
        await api.http.post(
            "/api/storage/upload", content=no_project, headers={**bearer(key), "Content-Type": ctype}
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert await object_rows(control_db, pid) == []
    assert await s3_keys(s3, f"{pid}/{bucket['id']}/") == []
    assert await s3_keys(s3, "_staging/") == []
    assert await multipart_uploads(s3, f"{pid}/") == []


@pytest.mark.parametrize(
    "name",
    [
        "../escape.txt",
        "/etc/passwd",
        "a/../../b",
        "a//b",
        "./a",
        "a/.",
        "dir/",
        "bad\x01name",
        "tab\tname",
        "new\nline",
        "back\\slash",
        "rtl\u202egpj.exe",
        "x" * 961,
    ],
)
async def test_names_cannot_escape_their_prefix(api: Api, project, s3, control_db, name: str) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "b1")
    for file_first in (True, False):
        r = await upload(api, key, pid, "b1", "ok.txt", b"x", file_first=file_first, name=name)
        assert "Invalid file name" in assert_error(r, 400, "VALIDATION_ERROR")["error"]["message"]
    assert await object_rows(control_db, pid) == []
    assert await s3_keys(s3, pid) == []
    assert await s3_keys(s3, f"{pid}/{bucket['id']}") == []
    r = await api.http.post(
        "/api/storage/upload-url",
        json={"projectId": pid, "bucketId": "b1", "name": name},
        headers=bearer(key),
    )
    assert_error(r, 400, "VALIDATION_ERROR")


async def test_allowed_mime_types(api: Api, project, control_db) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "pics", allowedMimeTypes=["image/*", "application/pdf"])
    for file_first in (True, False):
        assert_error(
            await upload(api, key, pid, "pics", "x.html", b"<script>", "text/html", file_first=file_first),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        )
    assert (await upload(api, key, pid, "pics", "x.png", b"png", "image/png")).status_code == 201
    assert (await upload(api, key, pid, "pics", "x.pdf", b"pdf", "application/pdf")).status_code == 201
    assert_error(
        await api.http.post(
            "/api/storage/buckets",
            json={"projectId": pid, "name": "b2", "allowedMimeTypes": ["not a type"]},
            headers=bearer(key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    r = await api.http.patch(
        "/api/storage/buckets",
        json={"projectId": pid, "bucketId": "pics", "allowedMimeTypes": None},
        headers=bearer(key),
    )
    assert r.status_code == 200 and r.json()["bucket"]["allowedMimeTypes"] is None
    assert (await upload(api, key, pid, "pics", "x.html", b"<p>", "text/html")).status_code == 201
    assert len(await object_rows(control_db, pid)) == 3


# ---------------------------------------------------------------------------------------------
# limits


async def test_max_file_size_is_enforced_while_streaming(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "b1")
    await control_db.execute(
        "INSERT INTO fluxbase.storage_limits (project_id, max_file_size) VALUES ($1, $2)", pid, MIB
    )
    big = os.urandom(3 * MIB)

    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    for file_first in (False, True):
        parts = [("file", "big.bin", "application/octet-stream", big)]
        meta = fields(pid, "b1")
        body, ctype = form(parts + meta if file_first else meta + parts)
        # Chunked: no Content-Length, so the limit can only be enforced on the bytes as they stream.
        r = await api.http.post(
            "/api/storage/upload", content=chunked(body), headers={**bearer(key), "Content-Type": ctype}
        )
        assert "maximum file size" in assert_error(r, 413, "PAYLOAD_TOO_LARGE")["error"]["message"]
        # With Content-Length, refused before reading.
        r = await api.http.post(
            "/api/storage/upload", content=body, headers={**bearer(key), "Content-Type": ctype}
        )
        assert_error(r, 413, "PAYLOAD_TOO_LARGE")
    assert await object_rows(control_db, pid) == []
    assert await s3_keys(s3, f"{pid}/{bucket['id']}/") == []
    assert await s3_keys(s3, "_staging/") == []
    assert await multipart_uploads(s3, f"{pid}/") == []
    assert await multipart_uploads(s3, "_staging/") == []
    ok = await upload(api, key, pid, "b1", "fits.bin", big[:MIB])
    assert ok.status_code == 201 and ok.json()["file"]["size"] == MIB


async def test_storage_quota(api: Api, project, control_db) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "b1")
    await control_db.execute(
        "INSERT INTO fluxbase.storage_limits (project_id, quota_bytes) VALUES ($1, $2)", pid, 3 * MIB // 2
    )
    assert (await upload(api, key, pid, "b1", "one.bin", os.urandom(MIB))).status_code == 201
    for file_first in (True, False):
        r = await upload(api, key, pid, "b1", "two.bin", os.urandom(MIB), file_first=file_first)
        assert "quota" in assert_error(r, 413, "STORAGE_QUOTA_EXCEEDED")["error"]["message"]
    r = await api.http.post(
        "/api/storage/upload-url",
        json={"projectId": pid, "bucketId": "b1", "name": "p.bin", "size": MIB},
        headers=bearer(key),
    )
    assert_error(r, 413, "STORAGE_QUOTA_EXCEEDED")
    assert [r["name"] for r in await object_rows(control_db, pid)] == ["one.bin"]
    listing = (
        await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(key))
    ).json()
    assert listing["limits"] == {"maxFileSize": 100 * MIB, "quotaBytes": 3 * MIB // 2, "usedBytes": MIB}


def _rss_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_100mb_upload_streams_with_flat_memory(api: Api, project, s3, instance, control_db) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "big")
    await control_db.execute(
        "INSERT INTO fluxbase.storage_limits (project_id, max_file_size) VALUES ($1, $2)", pid, 200 * MIB
    )
    size = 100 * MIB
    block = os.urandom(MIB)
    head, ctype = form(fields(pid, "big"))
    head = head[: -len(f"--{BOUNDARY}--\r\n")]  # keep the form open for the file part
    file_head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    digest = hashlib.sha256()
    for _ in range(size // MIB):
        digest.update(block)

    async def body() -> AsyncIterator[bytes]:
        yield head + file_head
        for _ in range(size // MIB):
            yield block
        yield tail

    server = instance.server.proc.pid
    await asyncio.sleep(0.2)
    before = _rss_kib(server, "VmRSS")
    _reset_peak_rss(server)
    started = time.monotonic()
    r = await api.http.post(
        "/api/storage/upload",
        content=body(),
        timeout=240,
        headers={
            **bearer(key),
            "Content-Type": ctype,
            "Content-Length": str(len(head) + len(file_head) + size + len(tail)),
        },
    )
    elapsed = time.monotonic() - started
    peak = _rss_kib(server, "VmHWM")
    assert r.status_code == 201, r.text
    file = r.json()["file"]
    assert file["size"] == size and file["s3_key"] == f"{pid}/{bucket['id']}/big.bin"
    growth_mb = (peak - before) / 1024
    print(f"\n100 MiB upload: {size / MIB / elapsed:.1f} MiB/s, server peak RSS growth {growth_mb:.1f} MiB")
    assert growth_mb < 60, f"server RSS grew by {growth_mb:.1f} MiB during a 100 MiB upload"
    head_obj = await s3.client.head_object(Bucket=s3.bucket, Key=file["s3_key"])
    assert head_obj["ContentLength"] == size
    # Download through a presigned URL and compare the hash.
    url = (await sign(api, key, pid, file["s3_key"])).json()["url"]
    got = hashlib.sha256()
    async with httpx.AsyncClient(timeout=120) as plain, plain.stream("GET", url) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_bytes():
            got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# presigned URLs


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_presigned_download_url(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "b1")
    content = os.urandom(5000)
    s3_key = (await upload(api, key, pid, "b1", "photo.jpg", content, "image/jpeg")).json()["file"]["s3_key"]

    r = await sign(api, key, pid, s3_key)
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["expiresIn"] == 900  # 15 minutes by default
    assert "publicUrl" not in body  # private bucket
    assert dict(parse_qsl(urlsplit(body["url"]).query))["X-Amz-Expires"] == "900"
    assert_clean(r, project.admin_key)
    async with httpx.AsyncClient() as plain:
        got = await plain.get(body["url"])
        assert got.status_code == 200 and got.content == content
        assert got.headers["content-type"] == "image/jpeg"
        # A tampered signature, or a different key under the same signature, is refused by S3.
        sig = dict(parse_qsl(urlsplit(body["url"]).query))["X-Amz-Signature"]
        flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
        assert (await plain.get(_with_query(body["url"], **{"X-Amz-Signature": flipped}))).status_code == 403
        assert (await plain.get(_with_query(body["url"], **{"X-Amz-Expires": "3600"}))).status_code == 403
        other = body["url"].replace("/photo.jpg", "/other.jpg")
        assert (await plain.get(other)).status_code == 403

        short = (await sign(api, key, pid, s3_key, expiresIn=2)).json()
        assert short["expiresIn"] == 2
        assert (await plain.get(short["url"])).status_code == 200
        await asyncio.sleep(3.5)
        expired = await plain.get(short["url"])
        assert expired.status_code == 403 and "expired" in expired.text.lower()

    long = await sign(api, key, pid, s3_key, expiresIn=24 * 3600)
    assert long.status_code == 200 and long.json()["expiresIn"] == 86400
    for bad in (0, -5, 7 * 24 * 3600 + 1):
        assert_error(await sign(api, key, pid, s3_key, expiresIn=bad), 400, "VALIDATION_ERROR")
    assert_error(await sign(api, key, pid, s3_key.replace("photo.jpg", "nope.jpg")), 404, "NOT_FOUND")


async def test_presigned_post_upload(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "b1")
    r = await api.http.post(
        "/api/storage/upload-url",
        json={
            "projectId": pid,
            "bucketId": "b1",
            "name": "direct/pic.png",
            "contentType": "image/png",
            "expiresIn": 120,
        },
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    grant = r.json()
    assert grant["method"] == "POST" and grant["maxSize"] == 100 * MIB
    assert (
        grant["file"]["status"] == "pending"
        and grant["file"]["s3_key"] == f"{pid}/{bucket['id']}/direct/pic.png"
    )
    assert_clean(r, s3.settings.secret_key)
    file_id = grant["file"]["id"]
    # Not listed, and not confirmable, before the bytes arrive.
    listed = await api.http.get(
        "/api/storage/files", params={"projectId": pid, "bucketId": "b1"}, headers=bearer(key)
    )
    assert listed.json()["files"] == []
    assert_error(
        await api.http.post(
            "/api/storage/upload-url/confirm", json={"projectId": pid, "fileId": file_id}, headers=bearer(key)
        ),
        409,
        "CONFLICT",
    )
    async with httpx.AsyncClient() as plain:
        wrong_type = await plain.post(
            grant["url"],
            data={**grant["fields"], "Content-Type": "text/html"},
            files={"file": ("pic.png", b"<script>", "text/html")},
        )
        assert wrong_type.status_code == 403
        other_key = await plain.post(
            grant["url"],
            data={**grant["fields"], "key": f"{pid}/{bucket['id']}/evil"},
            files={"file": ("pic.png", b"png", "image/png")},
        )
        assert other_key.status_code == 403
        ok = await plain.post(
            grant["url"], data=grant["fields"], files={"file": ("pic.png", b"PNGDATA", "image/png")}
        )
        assert ok.status_code in (200, 201, 204), ok.text
    # The form writes to a staging key of its own (no "evil"); the file appears on confirm.
    assert grant["fields"]["key"].startswith(f"_presigned/{pid}/")
    assert await s3_keys(s3, f"{pid}/{bucket['id']}/") == []
    assert await s3_keys(s3, f"_presigned/{pid}/") == [grant["fields"]["key"]]
    r = await api.http.post(
        "/api/storage/upload-url/confirm", json={"projectId": pid, "fileId": file_id}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    assert await s3_keys(s3, f"{pid}/{bucket['id']}/") == [f"{pid}/{bucket['id']}/direct/pic.png"]
    assert await s3_keys(s3, f"_presigned/{pid}/") == []
    assert r.json()["file"]["size"] == 7 and r.json()["file"]["contentType"] == "image/png"
    assert "status" not in r.json()["file"]
    again = await api.http.post(
        "/api/storage/upload-url/confirm", json={"projectId": pid, "fileId": file_id}, headers=bearer(key)
    )
    assert again.status_code == 200 and again.json()["file"]["id"] == file_id

    # A declared size pins content-length-range: a bigger body is refused by S3 itself.
    r = await api.http.post(
        "/api/storage/upload-url",
        json={"projectId": pid, "bucketId": "b1", "name": "s.bin", "size": 10},
        headers=bearer(key),
    )
    grant = r.json()
    async with httpx.AsyncClient() as plain:
        too_big = await plain.post(
            grant["url"],
            data=grant["fields"],
            files={"file": ("s.bin", b"x" * 11, "application/octet-stream")},
        )
        assert too_big.status_code == 400 and "EntityTooLarge" in too_big.text
    assert_error(
        await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": pid, "bucketId": "b1", "name": "direct/pic.png"},
            headers=bearer(key),
        ),
        409,
        "CONFLICT",
    )
    assert_error(
        await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": pid, "bucketId": "b1", "name": "t.bin", "expiresIn": 99999},
            headers=bearer(key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    rows = {r["name"]: r["status"] for r in await object_rows(control_db, pid)}
    assert rows == {"direct/pic.png": "ready", "s.bin": "pending"}


# ---------------------------------------------------------------------------------------------
# deleting


async def test_delete_files(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "b1")
    keys = [(await upload(api, key, pid, "b1", f"f{i}.txt", b"x")).json()["file"]["s3_key"] for i in range(4)]
    # The doc's DELETE /api/storage/delete?s3Key=&projectId=
    r = await api.http.delete(
        "/api/storage/delete", params={"s3Key": keys[0], "projectId": pid}, headers=bearer(key)
    )
    assert r.status_code == 200 and r.json() == {"success": True, "deleted": [keys[0]], "notFound": []}
    assert_error(
        await api.http.delete(
            "/api/storage/delete", params={"s3Key": keys[0], "projectId": pid}, headers=bearer(key)
        ),
        404,
        "NOT_FOUND",
    )
    # DELETE /api/storage/files with a JSON body, one key or several.
    r = await api.http.request(
        "DELETE", "/api/storage/files", json={"projectId": pid, "s3Key": keys[1]}, headers=bearer(key)
    )
    assert r.status_code == 200 and r.json()["deleted"] == [keys[1]]
    r = await api.http.request(
        "DELETE",
        "/api/storage/files",
        json={"projectId": pid, "s3Keys": [keys[2], keys[3], keys[0]]},
        headers=bearer(key),
    )
    assert (
        r.status_code == 200
        and r.json()["deleted"] == [keys[2], keys[3]]
        and r.json()["notFound"] == [keys[0]]
    )
    assert await object_rows(control_db, pid) == []
    for k in keys:
        assert await s3_keys(s3, k) == []
    assert_error(
        await api.http.delete("/api/storage/files", params={"projectId": pid}, headers=bearer(key)),
        400,
        "VALIDATION_ERROR",
    )


async def test_delete_project_removes_its_objects(api: Api, project, s3) -> None:
    await create_bucket(api, project.admin_key, project.id, "b1")
    assert (await upload(api, project.admin_key, project.id, "b1", "a.txt", b"a")).status_code == 201
    assert len(await s3_keys(s3, f"{project.id}/")) == 1
    r = await api.http.delete(f"/api/projects/{project.id}", headers=bearer(project.owner_token))
    assert r.status_code == 200
    assert await s3_keys(s3, f"{project.id}/") == []


# ---------------------------------------------------------------------------------------------
# safety


async def test_scopes(api: Api, project, control_db) -> None:
    pid, owner = project.id, project.owner_token
    admin = project.admin_key
    read = await api.new_key(owner, pid, "read")
    readwrite = await api.new_key(owner, pid, "readwrite")
    await create_bucket(api, admin, pid, "b1")
    s3_key = (await upload(api, admin, pid, "b1", "a.txt", b"a")).json()["file"]["s3_key"]

    async def attempts(key: str) -> dict[str, int]:
        out = {
            "listBuckets": (
                await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(key))
            ).status_code,
            "listFiles": (
                await api.http.get(
                    "/api/storage/files", params={"projectId": pid, "bucketId": "b1"}, headers=bearer(key)
                )
            ).status_code,
            "sign": (await sign(api, key, pid, s3_key)).status_code,
            "upload": (await upload(api, key, pid, "b1", f"{secrets.token_hex(4)}.txt", b"u")).status_code,
            "uploadUrl": (
                await api.http.post(
                    "/api/storage/upload-url",
                    json={"projectId": pid, "bucketId": "b1", "name": f"{secrets.token_hex(4)}.txt"},
                    headers=bearer(key),
                )
            ).status_code,
            "createBucket": (
                await api.http.post(
                    "/api/storage/buckets",
                    json={"projectId": pid, "name": secrets.token_hex(4)},
                    headers=bearer(key),
                )
            ).status_code,
            "renameBucket": (
                await api.http.patch(
                    "/api/storage/buckets",
                    json={"projectId": pid, "bucketId": "b1", "isPublic": False},
                    headers=bearer(key),
                )
            ).status_code,
            "deleteFile": (
                await api.http.delete(
                    "/api/storage/delete",
                    params={"projectId": pid, "s3Key": f"{s3_key}.none"},
                    headers=bearer(key),
                )
            ).status_code,
        }
        return out

    assert await attempts(read) == {
        "listBuckets": 200,
        "listFiles": 200,
        "sign": 200,
        "upload": 403,
        "uploadUrl": 403,
        "createBucket": 403,
        "renameBucket": 403,
        "deleteFile": 403,
    }
    assert await attempts(readwrite) == {
        "listBuckets": 200,
        "listFiles": 200,
        "sign": 200,
        "upload": 201,
        "uploadUrl": 201,
        "createBucket": 403,
        "renameBucket": 403,
        "deleteFile": 403,
    }
    assert await attempts(admin) == {
        "listBuckets": 200,
        "listFiles": 200,
        "sign": 200,
        "upload": 201,
        "uploadUrl": 201,
        "createBucket": 201,
        "renameBucket": 200,
        "deleteFile": 404,
    }
    assert_error(await upload(api, read, pid, "b1", "r.txt", b"r"), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(
        await api.http.delete(
            "/api/storage/delete", params={"projectId": pid, "s3Key": s3_key}, headers=bearer(readwrite)
        ),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    # Dashboard members: viewers read, developers upload, manage buckets and delete.
    viewer, viewer_token = await api.new_user()
    dev, dev_token = await api.new_user()
    await control_db.execute(
        "INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES "
        "($1, $2, 'viewer'), ($1, $3, 'developer')",
        pid,
        viewer["id"],
        dev["id"],
    )
    assert await attempts(viewer_token) == {
        "listBuckets": 200,
        "listFiles": 200,
        "sign": 200,
        "upload": 403,
        "uploadUrl": 403,
        "createBucket": 403,
        "renameBucket": 403,
        "deleteFile": 403,
    }
    assert await attempts(dev_token) == {
        "listBuckets": 200,
        "listFiles": 200,
        "sign": 200,
        "upload": 201,
        "uploadUrl": 201,
        "createBucket": 201,
        "renameBucket": 200,
        "deleteFile": 404,
    }
    # No credential at all.
    for r in (
        await api.http.get("/api/storage/buckets", params={"projectId": pid}),
        await api.http.get("/api/storage/url", params={"projectId": pid, "s3Key": s3_key}),
        await api.http.post(
            "/api/storage/upload", content=b"", headers={"Content-Type": "multipart/form-data"}
        ),
        await api.http.delete("/api/storage/delete", params={"projectId": pid, "s3Key": s3_key}),
    ):
        assert_error(r, 401, "AUTH_REQUIRED")


async def test_cross_project_isolation(api: Api, project, s3, control_db) -> None:
    a_key, a = project.admin_key, project.id
    _, b_owner = await api.new_user()
    b = await api.new_project(b_owner)
    b_key = await api.new_key(b_owner, b, "admin")
    a_bucket = await create_bucket(api, a_key, a, "shared-name")
    b_bucket = await create_bucket(api, b_key, b, "shared-name")  # unique per project only
    b_file = (await upload(api, b_key, b, "shared-name", "secret.txt", b"B's secret")).json()["file"]
    b_s3key = b_file["s3_key"]

    # A's key, B's project id: refused everywhere.
    for r in (
        await api.http.get("/api/storage/buckets", params={"projectId": b}, headers=bearer(a_key)),
        await api.http.get(
            "/api/storage/files", params={"projectId": b, "bucketId": "shared-name"}, headers=bearer(a_key)
        ),
        await sign(api, a_key, b, b_s3key),
        await api.http.delete(
            "/api/storage/delete", params={"projectId": b, "s3Key": b_s3key}, headers=bearer(a_key)
        ),
        await upload(api, a_key, b, "shared-name", "x.txt", b"x"),
        await upload(api, a_key, b, "shared-name", "x.txt", b"x", file_first=False),
        await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": b, "bucketId": "shared-name", "name": "x"},
            headers=bearer(a_key),
        ),
    ):
        assert_error(r, 403, "SCOPE_MISMATCH")
    # A's own project id with B's key material: the key is checked against projectId.
    assert_error(await sign(api, a_key, a, b_s3key), 403, "SCOPE_MISMATCH")
    assert_error(
        await api.http.delete(
            "/api/storage/delete", params={"projectId": a, "s3Key": b_s3key}, headers=bearer(a_key)
        ),
        403,
        "SCOPE_MISMATCH",
    )
    crafted = [
        f"{a}/{b_bucket['id']}/secret.txt",  # A's prefix, B's bucket
        f"{a}/{a_bucket['id']}/../../{b}/{b_bucket['id']}/secret.txt",
        f"{a}/../{b_s3key}",
        f"{a}/{a_bucket['id']}/%2e%2e/secret.txt",
        f"{a}/{b_bucket['id'].upper()}/secret.txt",
    ]
    for key in crafted:
        r = await sign(api, a_key, a, key)
        assert r.status_code in (400, 404), (key, r.text)
        assert_clean(r)
        r = await api.http.delete(
            "/api/storage/delete", params={"projectId": a, "s3Key": key}, headers=bearer(a_key)
        )
        assert r.status_code in (400, 404), (key, r.text)
    # B's bucket UUID from A's project: not found, and nothing is written anywhere.
    assert_error(await upload(api, a_key, a, b_bucket["id"], "x.txt", b"x"), 404, "NOT_FOUND")
    assert_error(
        await upload(api, a_key, a, b_bucket["id"], "x.txt", b"x", file_first=False), 404, "NOT_FOUND"
    )
    assert_error(
        await api.http.get(
            "/api/storage/files", params={"projectId": a, "bucketId": b_bucket["id"]}, headers=bearer(a_key)
        ),
        404,
        "NOT_FOUND",
    )
    assert_error(
        await api.http.request(
            "DELETE",
            "/api/storage/buckets",
            json={"projectId": a, "bucketId": b_bucket["id"]},
            headers=bearer(a_key),
        ),
        404,
        "NOT_FOUND",
    )
    # A session of A's owner is no member of B.
    assert_error(
        await api.http.get(
            "/api/storage/buckets", params={"projectId": b}, headers=bearer(project.owner_token)
        ),
        403,
        "SCOPE_MISMATCH",
    )
    assert_error(
        await upload(api, project.owner_token, b, "shared-name", "x.txt", b"x"), 403, "SCOPE_MISMATCH"
    )
    # B's file is untouched; A has nothing.
    assert await s3_get(s3, b_s3key) == b"B's secret"
    assert await object_rows(control_db, a) == []
    assert await s3_keys(s3, f"{a}/") == []


async def test_session_upload_with_file_first(api: Api, project, s3) -> None:
    """A dashboard session sends the doc's field order: the project is unknown until the end."""
    bucket = await create_bucket(api, project.admin_key, project.id, "b1")
    r = await upload(api, project.owner_token, project.id, "b1", "from-dashboard.txt", b"hi", "text/plain")
    assert r.status_code == 201, r.text
    assert await s3_get(s3, f"{project.id}/{bucket['id']}/from-dashboard.txt") == b"hi"
    assert await s3_keys(s3, "_staging/") == []


async def test_public_bucket_url(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "public-assets", isPublic=True)
    await create_bucket(api, key, pid, "private")
    content = b"<html><script>alert(1)</script></html>" + os.urandom(100)
    file = (await upload(api, key, pid, "public-assets", "site/index.html", content, "text/html")).json()[
        "file"
    ]
    assert file["publicUrl"] == f"{api.base_url}/api/storage/public/{file['s3_key']}"
    signed = (await sign(api, key, pid, file["s3_key"])).json()
    assert signed["publicUrl"] == file["publicUrl"]
    async with httpx.AsyncClient() as plain:
        r = await plain.get(file["publicUrl"])  # no key
        assert r.status_code == 200 and r.content == content
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"] == "sandbox"
        assert r.headers["content-length"] == str(len(content)) and "transfer-encoding" not in r.headers
        assert_error(
            await plain.get(file["publicUrl"], headers={"Range": f"bytes={len(content) + 10}-"}),
            416,
            "RANGE_NOT_SATISFIABLE",
        )
        part = await plain.get(file["publicUrl"], headers={"Range": "bytes=6-11"})
        assert part.status_code == 206 and part.content == content[6:12]
        assert part.headers["content-range"] == f"bytes 6-11/{len(content)}"
        private = (await upload(api, key, pid, "private", "p.txt", b"p")).json()["file"]
        assert "publicUrl" not in private
        assert_error(
            await plain.get(f"{api.base_url}/api/storage/public/{private['s3_key']}"), 404, "NOT_FOUND"
        )
        assert_error(
            await plain.get(f"{api.base_url}/api/storage/public/{pid}/../{private['s3_key']}"),
            404,
            "NOT_FOUND",
        )
        await api.http.patch(
            "/api/storage/buckets",
            json={"projectId": pid, "bucketId": "public-assets", "isPublic": False},
            headers=bearer(key),
        )
        assert_error(await plain.get(file["publicUrl"]), 404, "NOT_FOUND")


class TcpProxy:
    """A loopback TCP proxy to the test S3 that can be cut, to take S3 down under a running server.

    It runs on threads: the spawn fixture waits for /ready synchronously, blocking the event loop.
    """

    def __init__(self, target: str):
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


async def test_s3_down_is_503_and_leaves_no_row(spawn, stack) -> None:
    proxy = TcpProxy(stack.s3_endpoint)
    proxy.start()
    endpoint = proxy.url
    async with spawn(FLUXBASE_S3_ENDPOINT=endpoint) as inst:
        client = Api(inst.url)
        db = await asyncpg.connect(inst.env["FLUXBASE_DATABASE_URL"])
        try:
            _, token = await client.new_user()
            pid = await client.new_project(token)
            key = await client.new_key(token, pid, "admin")
            await create_bucket(client, key, pid, "b1")
            ok = await upload(client, key, pid, "b1", "before.txt", b"S3 is up")
            assert ok.status_code == 201, ok.text
            proxy.cut()  # S3 goes away under the running server
            for file_first in (True, False):
                for size in (10, 9 * MIB):  # one PUT, and a multipart upload
                    r = await upload(client, key, pid, "b1", "x.bin", os.urandom(size), file_first=file_first)
                    body = assert_error(r, 503, "STORAGE_UNAVAILABLE")
                    assert_clean(r, endpoint, stack.s3_access_key)
                    assert "Retry" in body["error"]["message"]
            assert [r["name"] for r in await db.fetch("SELECT name FROM fluxbase.objects")] == ["before.txt"]
            # A delete that cannot reach S3 changes nothing either: the file stays, ready.
            r = await client.http.delete(
                "/api/storage/delete",
                params={"projectId": pid, "s3Key": ok.json()["file"]["s3_key"]},
                headers=bearer(key),
            )
            assert_error(r, 503, "STORAGE_UNAVAILABLE")
            assert (
                await db.fetchval("SELECT status FROM fluxbase.objects WHERE name = 'before.txt'") == "ready"
            )
            r = await client.http.post(
                "/api/storage/upload-url",
                json={"projectId": pid, "bucketId": "b1", "name": "y.bin"},
                headers=bearer(key),
            )
            assert r.status_code == 201  # signing is local; the upload itself would then fail at S3
            confirm = await client.http.post(
                "/api/storage/upload-url/confirm",
                json={"projectId": pid, "fileId": r.json()["file"]["id"]},
                headers=bearer(key),
            )
            assert_error(confirm, 503, "STORAGE_UNAVAILABLE")
            ready = await client.http.get("/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["s3"] == "down"
        finally:
            await db.close()
            await client.close()


# ---------------------------------------------------------------------------------------------
# housekeeping


async def test_housekeeping_settles_crashes_and_orphans(api: Api, project, s3, instance, control_db) -> None:
    key, pid = project.admin_key, project.id
    bucket = await create_bucket(api, key, pid, "b1")
    bid = uuid.UUID(bucket["id"])
    prefix = f"{pid}/{bucket['id']}/"
    kept = (await upload(api, key, pid, "b1", "kept.txt", b"keep me")).json()["file"]
    replaced = (await upload(api, key, pid, "b1", "replaced.txt", b"old")).json()["file"]
    deleting = (await upload(api, key, pid, "b1", "deleting.txt", b"bye")).json()["file"]

    async def put(k: str, body: bytes) -> None:
        await s3.client.put_object(Bucket=s3.bucket, Key=k, Body=body)

    # 1. A streamed upload died after S3 completed but before its row became ready.
    await put(prefix + "crashed.txt", b"half")
    await control_db.execute(
        """INSERT INTO fluxbase.objects (bucket_id, project_id, name, s3_key, status, lease_id, lease_kind,
               lease_until) VALUES ($1, $2, 'crashed.txt', $3, 'pending', gen_random_uuid(), 'stream',
               now() - interval '1 minute')""",
        bid,
        pid,
        prefix + "crashed.txt",
    )
    # 2. A delete died between marking the row and removing the bytes.
    await control_db.execute(
        """UPDATE fluxbase.objects SET status = 'deleting', lease_id = gen_random_uuid(),
               lease_kind = 'delete', lease_until = now() - interval '1 minute' WHERE id = $1""",
        uuid.UUID(deleting["id"]),
    )
    # 3. A replacement died after the new bytes landed: the row must come to match S3.
    await put(replaced["s3_key"], b"new and longer")
    await control_db.execute(
        """UPDATE fluxbase.objects SET lease_id = gen_random_uuid(), lease_kind = 'stream',
               lease_until = now() - interval '1 minute', pending_size = 14 WHERE id = $1""",
        uuid.UUID(replaced["id"]),
    )
    # 4. Bytes with no row at all, and a staging leftover.
    await put(prefix + "orphan.bin", b"orphan")
    await put("_staging/" + str(uuid.uuid4()), b"staged")
    # 5. A presigned upload whose client never confirmed, and one that never uploaded.
    grant = (
        await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": pid, "bucketId": "b1", "name": "unconfirmed.png", "contentType": "image/png"},
            headers=bearer(key),
        )
    ).json()
    async with httpx.AsyncClient() as plain:
        assert (
            await plain.post(
                grant["url"], data=grant["fields"], files={"file": ("u.png", b"12345", "image/png")}
            )
        ).status_code == 204
    never = (
        await api.http.post(
            "/api/storage/upload-url",
            json={"projectId": pid, "bucketId": "b1", "name": "never.png"},
            headers=bearer(key),
        )
    ).json()
    await control_db.execute(
        """UPDATE fluxbase.objects SET upload_expires_at = now() - interval '2 minutes',
               lease_until = now() - interval '1 minute' WHERE id = ANY($1::uuid[])""",
        [uuid.UUID(grant["file"]["id"]), uuid.UUID(never["file"]["id"])],
    )
    # 6. An S3 multipart upload nobody finished.
    mpu = await s3.client.create_multipart_upload(Bucket=s3.bucket, Key=prefix + "abandoned.bin")

    settings = load_settings(instance.env)
    settings = msgspec.structs.replace(
        settings, storage=msgspec.structs.replace(settings.storage, orphan_grace_s=0, max_upload_s=0)
    )
    counts = await housekeeping(control_db, settings, s3)
    assert counts["storage.registered"] == 1 and counts["storage.repaired"] == 1
    assert counts["storage.undone"] == 3  # crashed upload, dead delete, never-uploaded presigned
    assert counts["storage.orphans"] >= 2 and counts["storage.aborted"] >= 1

    rows = {r["name"]: r for r in await object_rows(control_db, pid)}
    assert set(rows) == {"kept.txt", "replaced.txt", "unconfirmed.png"}
    assert all(r["status"] == "ready" and r["lease_id"] is None for r in rows.values())
    assert rows["replaced.txt"]["size"] == 14 and rows["unconfirmed.png"]["size"] == 5
    assert await s3_keys(s3, prefix) == sorted(
        prefix + n for n in ("kept.txt", "replaced.txt", "unconfirmed.png")
    )
    assert await s3_keys(s3, "_staging/") == []
    assert mpu["UploadId"] not in [u for u in await multipart_uploads(s3, prefix)]
    assert prefix + "abandoned.bin" not in await multipart_uploads(s3, prefix)
    assert await s3_get(s3, kept["s3_key"]) == b"keep me"
    # Nothing left to do the second time.
    again = await housekeeping(control_db, settings, s3)
    assert {k: v for k, v in again.items() if k.startswith("storage.")} == {
        "storage.registered": 0,
        "storage.undone": 0,
        "storage.repaired": 0,
        "storage.orphans": 0,
        "storage.aborted": 0,
    }


async def test_openapi_lists_storage_operations(api: Api) -> None:
    spec = (await api.http.get("/schema/openapi.json")).json()
    op_ids = {
        op["operationId"] for path in spec["paths"].values() for op in path.values() if "operationId" in op
    }
    assert {
        "listBuckets",
        "createBucket",
        "updateBucket",
        "deleteBucket",
        "uploadFile",
        "listFiles",
        "getFileUrl",
        "deleteFiles",
        "deleteFile",
        "createUploadUrl",
        "confirmUpload",
        "getPublicFile",
    } <= op_ids


async def test_odd_names_empty_files_and_concurrent_uploads(api: Api, project, s3, control_db) -> None:
    key, pid = project.admin_key, project.id
    await create_bucket(api, key, pid, "pub", isPublic=True)
    # Characters that mean something in URLs survive signing, public URLs and listing.
    name = "100% real #1?&x=y+z.txt"
    file = (
        await upload(api, key, pid, "pub", "x", b"odd", "text/plain", file_first=False, name=name)
    ).json()["file"]
    assert file["name"] == name
    async with httpx.AsyncClient() as plain:
        signed = (await sign(api, key, pid, file["s3_key"])).json()
        assert (await plain.get(signed["url"])).content == b"odd"
        assert (await plain.get(file["publicUrl"])).content == b"odd"
    # A zero-byte file is a file.
    empty = await upload(api, key, pid, "pub", "empty.txt", b"", "text/plain")
    assert empty.status_code == 201 and empty.json()["file"]["size"] == 0
    assert await s3_get(s3, empty.json()["file"]["s3_key"]) == b""
    # Two uploads of one new name at once: exactly one wins, the other is told, the bytes are whole.
    results = await asyncio.gather(
        *(
            upload(api, key, pid, "pub", "race.bin", bytes([i]) * (6 * MIB), file_first=bool(i % 2))
            for i in range(4)
        )
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201, 409, 409, 409], [r.text for r in results]
    winners = [r.json()["file"] for r in results if r.status_code == 201]
    stored = await s3_get(s3, winners[-1]["s3_key"])
    assert len(stored) == 6 * MIB and len(set(stored)) == 1
    row = await control_db.fetchrow(
        "SELECT size, status, lease_id FROM fluxbase.objects WHERE name = 'race.bin' AND project_id = $1", pid
    )
    assert row["size"] == 6 * MIB and row["status"] == "ready" and row["lease_id"] is None
    assert await multipart_uploads(s3, f"{pid}/") == []


async def test_public_endpoint_signs_urls_for_clients(api: Api, spawn, stack) -> None:
    public = stack.s3_endpoint.replace("127.0.0.1", "localhost")
    async with spawn(FLUXBASE_S3_PUBLIC_ENDPOINT=public) as inst:
        client = Api(inst.url)
        try:
            _, token = await client.new_user()
            pid = await client.new_project(token)
            key = await client.new_key(token, pid, "admin")
            await create_bucket(client, key, pid, "b1")
            file = (await upload(client, key, pid, "b1", "a.txt", b"via public endpoint")).json()["file"]
            url = (await sign(client, key, pid, file["s3_key"])).json()["url"]
            assert url.startswith(public + "/")
            async with httpx.AsyncClient() as plain:
                assert (await plain.get(url)).content == b"via public endpoint"
            grant = (
                await client.http.post(
                    "/api/storage/upload-url",
                    json={"projectId": pid, "bucketId": "b1", "name": "b.txt"},
                    headers=bearer(key),
                )
            ).json()
            assert grant["url"].startswith(public + "/")
        finally:
            await client.close()


def test_storage_settings_are_checked() -> None:
    from fluxbase.config import ConfigError

    base = {
        "FLUXBASE_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
        "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:1",
        "FLUXBASE_S3_ACCESS_KEY": "a",
        "FLUXBASE_S3_SECRET_KEY": "b",
        "FLUXBASE_SECRET_KEY": "s" * 32,
    }
    settings = load_settings({**base, "FLUXBASE_STORAGE_MAX_FILE_SIZE": "1048576"})
    assert settings.storage.max_file_size == MIB and settings.storage.url_expires_default_s == 900
    with pytest.raises(ConfigError, match="FLUXBASE_STORAGE_PART_SIZE"):
        load_settings({**base, "FLUXBASE_STORAGE_PART_SIZE": str(4 * MIB)})
    with pytest.raises(ConfigError, match="604800"):
        load_settings({**base, "FLUXBASE_STORAGE_URL_EXPIRES_MAX_S": str(8 * 24 * 3600)})
