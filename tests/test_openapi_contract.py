"""The OpenAPI contract, checked by a tool nobody here wrote: schemathesis against the live API.

Every operation of /schema/openapi.json is called with generated requests (seeded, so a run is
reproducible), authenticated as its `security` says (an admin API key where one is allowed,
else a dashboard session). Each answer must not be a 5xx, must have a documented status, content
type and body schema, and must not carry a secret, a stack trace or SQL text of the server.
A second, cheap test holds the document itself: every operation documents a typed 2xx body,
a request body where it takes one, its error envelope and its security.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Instance, ProjectCtx
from support import NEVER_IN_RESPONSES

pytestmark = pytest.mark.timeout(300)  # 66 s at load 10 on 2 cores, 166 s at load 25

MAX_EXAMPLES = 4
SEED = 18
# Operations that hash a password or dump a database: two examples each keep the budget.
SLOW = {
    "login",
    "register",
    "resetAccountPassword",
    "projectUserLogin",
    "projectUserRegister",
    "projectUserResetPassword",
    "exportProject",
}

# Run last, in this order: they end the session or the project the other operations use.
LAST = ("deleteProject", "logout")

# SQL the server itself runs; none of it may reach a body (a project's own statement text is
# echoed in its SQL errors, so only the platform's own catalog is looked for).
SERVER_SQL = (
    "fluxbase.api_keys",
    "fluxbase.projects",
    "fluxbase.users",
    "fluxbase.sessions",
    "pg_stat_activity",
)
RAW_KEY = re.compile(r"flx_live_[0-9A-Za-z]{49}")  # fluxbase.security.apikeys
KEY_ANSWERS = ("createApiKey", "rotateApiKey")


@dataclass
class Tally:
    operations: int = 0
    responses: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _secrets(instance: Instance) -> list[str]:
    env = instance.env
    out = [env["FLUXBASE_SECRET_KEY"], env.get("FLUXBASE_S3_SECRET_KEY", "")]
    password = urlsplit(env["FLUXBASE_DATABASE_URL"]).password
    if password:
        out.append(password)
    return [s for s in out if s and len(s) >= 8]


def _no_leak(op_id: str, body: str, secrets: list[str], own_key: str) -> str | None:
    for s in secrets:
        if s in body:
            return "a server secret"
    for s in NEVER_IN_RESPONSES:
        if s in body:
            return f"{s!r}"
    for s in SERVER_SQL:
        if s in body:
            return f"server SQL ({s})"
    if op_id not in KEY_ANSWERS and (own_key in body or RAW_KEY.search(body)):
        return "a raw API key"
    return None


def _pin_project(case: Any, project_id: str, op_id: str) -> None:
    """Point generated requests at the test's project (most of them, so they get past 404)."""
    if op_id == "deleteProject":
        return  # it deletes a random id: the project stays for the other operations
    if case.path_parameters and "project_id" in case.path_parameters:
        case.path_parameters["project_id"] = project_id
    if case.query and "projectId" in case.query:
        case.query["projectId"] = project_id
    if isinstance(case.body, dict) and "projectId" in case.body:
        case.body["projectId"] = project_id


def _headers(op: Any, auth: dict[str, str]) -> dict[str, str]:
    """The credential the operation's `security` asks for: an API key where one is allowed."""
    schemes = {name for req in op.definition.raw.get("security", []) for name in req}
    for scheme in ("apiKey", "dashboardSession"):
        if scheme in schemes:
            return {"Authorization": f"Bearer {auth[scheme]}"}
    return {}


def _order(op: Any) -> int:
    op_id = op.definition.raw.get("operationId")
    return LAST.index(op_id) if op_id in LAST else -1


@dataclass
class Target:
    base_url: str
    auth: dict[str, str]
    project_id: str
    secrets: list[str]
    session: requests.Session = field(default_factory=requests.Session)


def _exercise(op: Any, target: Target, tally: Tally) -> None:
    op_id = op.definition.raw.get("operationId", op.label)
    headers = _headers(op, target.auth)

    @given(case=op.as_strategy())
    @settings(
        max_examples=2 if op_id in SLOW else MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: Any) -> None:
        _pin_project(case, target.project_id, op_id)
        response = case.call(base_url=target.base_url, session=target.session, headers=headers, timeout=30)
        tally.responses += 1
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        leak = _no_leak(op_id, response.text, target.secrets, target.auth["apiKey"])
        if leak:
            tally.failures.append(f"{op_id}: {response.status_code} carries {leak}")
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:  # one line per failure; every operation runs
            first = str(exc).strip().splitlines()
            tally.failures.append(f"{op_id}: {response.status_code} {' | '.join(first[:6])[:600]}")
            raise

    # Recorded in the tally (schemathesis raises a BaseExceptionGroup); go on with the next one.
    with contextlib.suppress(Exception, BaseExceptionGroup):
        exercise()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _run(schema: Any, target: Target) -> Tally:
    tally = Tally()
    for op in sorted((r.ok() for r in schema.get_all_operations()), key=_order):
        tally.operations += 1
        started, before = time.monotonic(), tally.responses
        _exercise(op, target, tally)
        print(  # progress with -s: the slow operations stand out
            f"{op.label}: {tally.responses - before} responses, {time.monotonic() - started:.2f} s",
            flush=True,
        )
    return tally


async def _document(instance: Instance) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=instance.url, timeout=30) as http:
        r = await http.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_every_operation_against_the_live_api(instance: Instance, project: ProjectCtx) -> None:
    doc = await _document(instance)
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.seed = SEED
    auth = {"apiKey": project.admin_key, "dashboardSession": project.owner_token}
    started = time.monotonic()
    target = Target(instance.url, auth, project.id, _secrets(instance))
    tally = await asyncio.to_thread(_run, schema, target)
    elapsed = time.monotonic() - started
    print(
        f"\nschemathesis: {tally.operations} operations, {tally.responses} responses in {elapsed:.1f} s; "
        f"statuses {dict(sorted(tally.statuses.items()))}"
    )
    assert tally.operations >= 100
    assert tally.responses >= tally.operations
    assert not tally.failures, "\n".join(tally.failures)


def test_the_leak_check_sees_each_kind_of_leak() -> None:
    """The check above could fail: a secret, a stack trace, server SQL and a raw key are seen."""
    from fluxbase.security import apikeys

    key, secret = apikeys.generate(), "s3cr3t-server-key-value"
    assert _no_leak("listApiKeys", '{"ok":1}', [secret], key) is None
    assert _no_leak("listApiKeys", f'{{"x":"{secret}"}}', [secret], key) == "a server secret"
    assert _no_leak("listApiKeys", "Traceback (most recent call last):", [secret], key)
    assert _no_leak("listApiKeys", "SELECT 1 FROM fluxbase.api_keys", [secret], key)
    assert _no_leak("listApiKeys", f'"{apikeys.generate()}"', [secret], key) == "a raw API key"
    assert _no_leak("createApiKey", f'"{apikeys.generate()}"', [secret], key) is None


# --- The document itself ------------------------------------------------------------------------

_BODYLESS = {"get", "delete"}


def _typed(schema: dict[str, Any] | None) -> bool:
    return bool(schema) and any(k in schema for k in ("$ref", "properties", "anyOf", "oneOf"))  # type: ignore[operator]


async def test_document_lists_bodies_errors_and_security_of_every_operation(instance: Instance) -> None:
    doc = await _document(instance)
    assert set(doc["components"]["securitySchemes"]) == {"apiKey", "dashboardSession", "projectUserToken"}
    untyped, no_body, no_errors, no_security = [], [], [], []
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "operationId" not in op:
                continue
            count += 1
            op_id = op["operationId"]
            ok = [r for s, r in op["responses"].items() if s.startswith("2")]
            media = [c for r in ok for c in r.get("content", {}).values()]
            if not any(
                _typed(m.get("schema")) or m.get("schema", {}).get("format") == "binary" for m in media
            ):
                untyped.append(op_id)
            if method not in _BODYLESS and op_id not in BODYLESS_WRITES and "requestBody" not in op:
                no_body.append(f"{method.upper()} {path}")
            errors = [s for s in op["responses"] if s[0] in "45"]
            if "500" not in errors or any(
                op["responses"][s]["content"]["application/json"]["schema"].get("$ref", "").split("/")[-1]
                != f"Error{s}"
                for s in errors
            ):
                no_errors.append(op_id)
            if "security" not in op:
                no_security.append(op_id)
    assert count >= 100
    assert not no_body, no_body
    assert not no_errors, no_errors
    assert not no_security, no_security
    assert not untyped, untyped


# POST/PATCH operations that take no body (their input is the path).
BODYLESS_WRITES = frozenset(
    {
        "logout",
        "rotateApiKey",
        "vacuumProject",
        "suspendProject",
        "resumeProject",
        "testWebhook",
        "redeliverWebhook",
        "projectUserLogout",
        "disableProjectUser",
        "enableProjectUser",
        "revokeProjectUserSessions",
        "resetMailTemplate",
    }
)
