"""Hostile review 10: the `contract` refactor (typed response Structs, `Caller.access`, and
`shapes.decode_body` for the bodies a route reads itself), attacked through the public HTTP API.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from dashboard_support import add_member
from support import Api, bearer
from test_attack_review1 import browser_key, end_user

# -- 1. authorisation: every project route keeps its level and its key-project binding -----------

P = "{p}"
# (method, path, body) of routes that need Need.MANAGE (admin key or admin member).
MANAGE: list[tuple[str, str, Any]] = [
    ("GET", "/api/projects/{p}/api-keys", None),
    ("POST", "/api/projects/{p}/api-keys", {"name": "x", "scope": "admin"}),
    ("GET", "/api/team?projectId={p}", None),
    ("POST", "/api/team", {"projectId": P, "email": "x@example.com", "role": "admin"}),
    ("GET", "/api/webhooks?projectId={p}", None),
    ("POST", "/api/webhooks", {"projectId": P, "url": "https://example.com/h", "events": ["row.inserted"]}),
    ("GET", "/api/projects/{p}/auth/settings", None),
    ("PATCH", "/api/projects/{p}/auth/settings", {"registrationOpen": False}),
    ("GET", "/api/projects/{p}/auth/users", None),
    ("GET", "/api/projects/{p}/log", None),
    ("GET", "/api/projects/{p}/rls", None),
    ("GET", "/api/projects/{p}/mail/templates", None),
    ("GET", "/api/projects/{p}/mail/log", None),
    ("PATCH", "/api/projects/{p}", {"readOnly": True}),
    ("POST", "/api/projects/{p}/vacuum", None),
    ("GET", "/api/projects/{p}/export", None),
    ("POST", "/api/realtime/settings", {"projectId": P, "schemaEventsToUsers": True}),
]
# Routes that need Need.SCHEMA (admin key or developer member).
SCHEMA: list[tuple[str, str, Any]] = [
    ("POST", "/api/projects/{p}/migrations", {"name": "m1", "sql": "CREATE TABLE atk (id int)"}),
    ("POST", "/api/realtime/enable", {"projectId": P, "tables": ["t"]}),
    ("POST", "/api/storage/buckets", {"projectId": P, "name": "atk"}),
    ("POST", "/api/projects/{p}/extensions", {"name": "pgcrypto"}),
]
# Routes that need Need.READ (any key of the project, any member).
READ: list[tuple[str, str, Any]] = [
    ("GET", "/api/projects/{p}", None),
    ("GET", "/api/projects/{p}/quotas", None),
    ("GET", "/api/projects/{p}/migrations", None),
    ("GET", "/api/projects/{p}/extensions", None),
    ("GET", "/api/realtime/tables?projectId={p}", None),
    ("GET", "/api/realtime/settings?projectId={p}", None),
    ("GET", "/api/version?projectId={p}", None),
]


def _fill(body: Any, pid: str) -> Any:
    if isinstance(body, dict):
        return {k: (pid if v == P else v) for k, v in body.items()}
    return body


async def _call(api: Api, cred: str, pid: str, route: tuple[str, str, Any]) -> Any:
    method, path, body = route
    kw: dict[str, Any] = {"headers": bearer(cred)}
    if body is not None:
        kw["json"] = _fill(body, pid)
    return await api.http.request(method, path.replace(P, pid), **kw)


@dataclass
class Cast:
    pid: str
    other_pid: str
    other_admin_key: str
    readwrite_key: str
    read_key: str
    browser_key: str
    developer: str
    viewer: str
    stranger: str


@pytest.fixture
async def cast(api: Api, project: Any) -> Cast:
    _other, other_token = await api.new_user()
    other_pid = await api.new_project(other_token)
    other_admin = await api.new_key(other_token, other_pid, "admin")
    dev, dev_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, dev, dev_token, "developer")
    viewer, viewer_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, viewer, viewer_token, "viewer")
    return Cast(
        project.id,
        other_pid,
        other_admin,
        await api.new_key(project.owner_token, project.id, "readwrite"),
        await api.new_key(project.owner_token, project.id, "read"),
        await browser_key(api, project),
        dev_token,
        viewer_token,
        other_token,
    )


async def _refused(api: Api, cred: str, pid: str, routes: list[tuple[str, str, Any]]) -> list[str]:
    """The routes this credential was NOT refused with a 403 on."""
    open_ = []
    for route in routes:
        r = await _call(api, cred, pid, route)
        if r.status_code != 403:
            open_.append(f"{route[0]} {route[1]} -> {r.status_code} {r.text[:120]}")
    return open_


async def test_management_routes_refuse_lower_keys_and_roles(api: Api, cast: Cast) -> None:
    for who, cred in [
        ("readwrite key", cast.readwrite_key),
        ("read key", cast.read_key),
        ("requireUserAuth key", cast.browser_key),
        ("developer", cast.developer),
        ("viewer", cast.viewer),
        ("non-member", cast.stranger),
        ("admin key of another project", cast.other_admin_key),
    ]:
        assert await _refused(api, cred, cast.pid, MANAGE) == [], who


async def test_schema_routes_refuse_read_keys_viewers_and_other_projects(api: Api, cast: Cast) -> None:
    for who, cred in [
        ("readwrite key", cast.readwrite_key),
        ("read key", cast.read_key),
        ("requireUserAuth key", cast.browser_key),
        ("viewer", cast.viewer),
        ("admin key of another project", cast.other_admin_key),
    ]:
        assert await _refused(api, cred, cast.pid, SCHEMA) == [], who


async def test_read_routes_refuse_other_projects_and_browser_keys(api: Api, cast: Cast) -> None:
    # A requireUserAuth key reaches only the end-user data surfaces, not project metadata.
    for who, cred in [
        ("requireUserAuth key", cast.browser_key),
        ("non-member", cast.stranger),
        ("admin key of another project", cast.other_admin_key),
    ]:
        assert await _refused(api, cred, cast.pid, READ) == [], who
    # ...and the lowest legitimate callers still get through (the table is not vacuous).
    for cred in (cast.read_key, cast.viewer):
        for route in READ:
            r = await _call(api, cred, cast.pid, route)
            assert r.status_code == 200, (route, r.text)


async def test_owner_routes_refuse_keys_and_non_admins(api: Api, cast: Cast, project: Any) -> None:
    for cred in (project.admin_key, cast.developer, cast.viewer, cast.other_admin_key):
        r = await api.http.delete(f"/api/projects/{cast.pid}", headers=bearer(cred))
        assert r.status_code == 403, r.text
    r = await api.http.get(f"/api/projects/{cast.pid}", headers=bearer(project.admin_key))
    assert r.status_code == 200, r.text


async def test_key_of_project_a_cannot_reach_project_b_through_a_body_or_query(
    api: Api, cast: Cast, project: Any
) -> None:
    # The project a route acts on comes from the path, the query or the body; an admin key of A
    # naming B anywhere is refused (and B's key list is not answered).
    r = await api.http.get(f"/api/team?projectId={cast.other_pid}", headers=bearer(project.admin_key))
    assert r.status_code == 403, r.text
    r = await api.http.post(
        "/api/realtime/token", json={"projectId": cast.other_pid}, headers=bearer(project.admin_key)
    )
    assert r.status_code == 403, r.text
    r = await api.http.post(
        "/api/realtime/broadcast",
        json={"projectId": cast.other_pid, "event": "x", "payload": 1},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 403, r.text


async def test_suspended_project_is_refused_on_refactored_routes(
    api: Api, cast: Cast, project: Any, instance_admin: dict[str, Any]
) -> None:
    r = await api.http.post(
        f"/api/admin/projects/{cast.pid}/suspend", headers=bearer(instance_admin["token"])
    )
    assert r.status_code == 200, r.text
    for cred in (project.admin_key, project.owner_token):
        for route in [*READ, *MANAGE[:3]]:
            r = await _call(api, cred, cast.pid, route)
            assert r.status_code == 403 and r.json()["error"]["code"] == "PROJECT_SUSPENDED", (route, r.text)


# -- 2. typed answers leak nothing the old dicts did not ------------------------------------------

SECRET_WORDS = ("hash", "password", "secret", "salt", "accesskey", "secretkey", "credential")
ALLOWED = {"jwtSecretSet"}


def _suspicious_keys(value: Any, path: str = "$") -> list[str]:
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ALLOWED and any(w in k.lower() for w in SECRET_WORDS):
                out.append(f"{path}.{k}")
            out += _suspicious_keys(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _suspicious_keys(v, f"{path}[{i}]")
    return out


async def test_answers_carry_no_hashes_secrets_or_credentials(
    api: Api, cast: Cast, project: Any, instance_admin: dict[str, Any]
) -> None:
    pid, admin = cast.pid, project.admin_key
    r = await api.http.post(
        "/api/webhooks",
        json={"projectId": pid, "url": "https://93.184.215.14/hook", "events": ["row.inserted"]},
        headers=bearer(admin),
    )
    assert r.status_code == 201, r.text
    hook = r.json()["webhook"]
    assert "secret" in hook  # shown once, at creation
    r = await api.http.patch(
        f"/api/projects/{pid}/auth/settings", json={"jwtSecret": "s" * 40}, headers=bearer(admin)
    )
    assert r.status_code == 200, r.text
    await end_user(api, pid)
    gets = [
        (admin, f"/api/projects/{pid}/api-keys"),
        (admin, f"/api/webhooks?projectId={pid}"),
        (admin, f"/api/webhooks/{hook['id']}"),
        (admin, f"/api/projects/{pid}/auth/settings"),
        (admin, f"/api/projects/{pid}/auth/users"),
        (admin, f"/api/projects/{pid}/log"),
        (project.owner_token, f"/api/team?projectId={pid}"),
        (project.owner_token, "/api/projects"),
        (project.owner_token, "/api/auth/me"),
        (instance_admin["token"], "/api/admin/projects"),
        (admin, f"/api/storage/buckets?projectId={pid}"),
        (admin, f"/api/realtime/settings?projectId={pid}"),
    ]
    for cred, path in gets:
        r = await api.http.get(path, headers=bearer(cred))
        assert r.status_code == 200, (path, r.text)
        assert _suspicious_keys(r.json()) == [], path
        assert "s" * 40 not in r.text and hook["secret"] not in r.text, path


async def test_key_and_member_answers_have_exactly_the_documented_fields(
    api: Api, cast: Cast, project: Any
) -> None:
    r = await api.http.get(f"/api/projects/{cast.pid}/api-keys", headers=bearer(project.admin_key))
    fields = {
        "id", "projectId", "name", "prefix", "scope", "allowedOrigins", "createdAt",
        "lastUsedAt", "expiresAt", "revokedAt", "requireUserAuth",
    }  # fmt: skip
    for k in r.json()["apiKeys"]:
        assert set(k) == fields
    r = await api.http.get(f"/api/team?projectId={cast.pid}", headers=bearer(project.owner_token))
    for m in r.json()["members"]:
        assert set(m) == {"userId", "email", "displayName", "role", "joinedAt"}
    # `role` is the caller's own, and only where the caller is a member (omit_defaults, not null).
    r = await api.http.get(f"/api/projects/{cast.pid}", headers=bearer(project.admin_key))
    assert "role" not in r.json()["project"], r.text
    r = await api.http.get(f"/api/projects/{cast.pid}", headers=bearer(cast.viewer))
    assert r.json()["project"]["role"] == "viewer", r.text


# -- 3. decode_body: the bodies routes read themselves --------------------------------------------


async def _table(api: Api, project: Any) -> str:
    r = await api.sql(project.admin_key, project.id, "CREATE TABLE notes (id serial PRIMARY KEY, body jsonb)")
    assert r.json()["success"], r.text
    return f"/api/projects/{project.id}/tables/notes/records"


async def test_settings_patch_refuses_unknown_fields_and_type_confusion(api: Api, project: Any) -> None:
    path = f"/api/projects/{project.id}/auth/settings"
    h = bearer(project.admin_key)
    for raw in (
        b'{"registrationOpen": 1}',  # int for a bool
        b'{"registrationOpen": "false"}',
        b'{"jwtSecrett": "typo"}',  # unknown fields were refused before the refactor too
        b"[]",
        b"not json",
        b"",
    ):
        r = await api.http.patch(path, content=raw, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR", (raw, r.text)
    r = await api.http.get(path, headers=h)
    assert r.json()["settings"]["registrationOpen"] is True, r.text


async def test_settings_patch_body_over_the_size_limit_is_refused(api: Api, project: Any) -> None:
    raw = b'{"redirectUrls": ["' + b"a" * 11_000_000 + b'"]}'
    r = await api.http.patch(
        f"/api/projects/{project.id}/auth/settings",
        content=raw,
        headers={**bearer(project.admin_key), "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text[:200]


async def test_huge_numbers_in_a_record_are_a_validation_error(api: Api, project: Any) -> None:
    path = await _table(api, project)
    h = {**bearer(project.admin_key), "Content-Type": "application/json"}
    # (a 400-digit integer is kept exactly, as jsonb numeric; beyond msgspec's range it is refused)
    for raw in (b'{"body": 1' + b"0" * 5000 + b"}", b'{"body": 1e999}', b'{"body": -1e999}'):
        r = await api.http.post(path, content=raw, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR", r.text


DEEP = 20_000


def _deep_body(obj: dict[str, Any], field: str) -> bytes:
    """`obj` with `field` set to DEEP nested empty arrays."""
    deep = b'"' + field.encode() + b'": ' + b"[" * DEEP + b"]" * DEEP
    return json.dumps(obj).encode()[:-1] + (b", " if obj else b"") + deep + b"}"


# Fixed in this review (shapes.decode_body and the execute-sql/-batch decoders now map msgspec's
# RecursionError to 400): before, each of these was a 500 INTERNAL_ERROR logged as a crash.
@pytest.mark.parametrize(
    "route",
    [
        ("/api/projects/{p}/tables/notes/records", "body", {}),
        ("/api/execute-sql", "params", {"query": "SELECT 1"}),
        ("/api/execute-batch", "params", {"query": "SELECT 1"}),
    ],
)
async def test_deeply_nested_hand_read_body_is_a_validation_error(
    api: Api, project: Any, route: tuple[str, str, dict[str, Any]]
) -> None:
    path, field, rest = route
    await _table(api, project)
    if "batch" in path:  # the deep value inside the one statement
        one = _deep_body(rest, field).decode()
        raw = f'{{"projectId": "{project.id}", "statements": [{one}]}}'.encode()
    else:
        raw = _deep_body(rest if P in path else {"projectId": project.id, **rest}, field)
    r = await api.http.post(
        path.replace(P, project.id),
        content=raw,
        headers={**bearer(project.admin_key), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR", r.text[:200]


@pytest.mark.parametrize(
    "route",
    [("/api/realtime/broadcast", "payload", {"event": "x"})],
)
async def test_deeply_nested_any_field_in_a_litestar_body_is_a_4xx(
    api: Api, project: Any, route: tuple[str, str, dict[str, Any]]
) -> None:
    path, field, rest = route
    raw = _deep_body({"projectId": project.id, **rest}, field)
    r = await api.http.post(
        path, content=raw, headers={**bearer(project.admin_key), "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])


async def test_duplicate_keys_take_the_last_value_consistently(api: Api, project: Any) -> None:
    # Informational: msgspec keeps the LAST of duplicate keys, for typed and untyped bodies alike,
    # so the route and the authorisation step read the same value (no split reading).
    path = f"/api/projects/{project.id}/auth/settings"
    raw = b'{"registrationOpen": true, "registrationOpen": false}'
    r = await api.http.patch(
        path, content=raw, headers={**bearer(project.admin_key), "Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["settings"]["registrationOpen"] is False, r.text


async def test_typed_bodies_refuse_type_confusion(api: Api, project: Any) -> None:
    # Litestar decodes `data:` bodies with msgspec's lax mode (strict=False), unlike decode_body:
    # "0"/"false" -> False, "true" -> True, "30" or 1e3 -> int. That is sane (no string is
    # "truthy"), but bool-for-int, out-of-range ints, unknown spellings and a string for a list
    # are refused, and no key is created by them.
    path = f"/api/projects/{project.id}/api-keys"
    h = bearer(project.admin_key)
    before = len((await api.http.get(path, headers=h)).json()["apiKeys"])
    for extra in (
        {"expiresInDays": True},
        {"requireUserAuth": "yes"},
        {"requireUserAuth": 2},
        # Fixed in this review: over the `integer` column these were 500 INTERNAL_ERROR.
        {"rateLimitRequests": 2**70, "rateLimitWindowSeconds": 60},
        {"rateLimitRequests": 2**31, "rateLimitWindowSeconds": 60},
        {"rateLimitRequests": 10, "rateLimitWindowSeconds": 2**31},
        {"allowedOrigins": "https://evil.example"},
    ):
        r = await api.http.post(path, json={"name": "k", "scope": "read", **extra}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR", (extra, r.text)
    assert len((await api.http.get(path, headers=h)).json()["apiKeys"]) == before
    r = await api.http.post(path, json={"name": "k", "scope": "read", "requireUserAuth": "true"}, headers=h)
    assert r.status_code == 201 and r.json()["apiKey"]["requireUserAuth"] is True, r.text
