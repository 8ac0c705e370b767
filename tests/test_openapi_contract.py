"""The OpenAPI contract, checked by a tool nobody here wrote: schemathesis against the live API.

Every operation of /schema/openapi.json is called with generated requests (seeded, so a run is
reproducible), authenticated as its `security` says (an admin API key where one is allowed,
else a dashboard session). Each answer must not be a 5xx, must have a documented status, content
type and body schema (an error's code must be one the operation lists), and must not carry a
secret, a stack trace or SQL text of the server. Operations with input are also called with
input their schema forbids, and those that take a credential once with one that does not exist,
so error answers are checked too. A stateful run follows the document's links.
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
from schemathesis import GenerationMode
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
NEGATIVE_EXAMPLES = 2
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
    codes: dict[str, int] = field(default_factory=dict)  # error codes answered
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
    if op_id == "updateProject" and isinstance(case.body, dict) and case.body.get("readOnly"):
        case.body["readOnly"] = False  # a read-only project refuses every write the run makes next


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


def _check(op_id: str, case: Any, response: Any, target: Target, tally: Tally) -> None:
    tally.responses += 1
    tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
    if response.status_code >= 400:
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            code = response.json()["error"]["code"]
            tally.codes[code] = tally.codes.get(code, 0) + 1
    leak = _no_leak(op_id, response.text, target.secrets, target.auth["apiKey"])
    if leak:
        tally.failures.append(f"{op_id}: {response.status_code} carries {leak}")
    try:
        # The error answers' codes are checked here too: each operation's error schema lists
        # only the codes it can answer (http.error_codes), so a code it does not list fails.
        case.validate_response(response, checks=CHECKS)
    except (Exception, BaseExceptionGroup) as exc:  # one line per failure; every operation runs
        first = str(exc).strip().splitlines()
        tally.failures.append(f"{op_id}: {response.status_code} {' | '.join(first[:6])[:600]}")
        raise


def _exercise(op: Any, target: Target, tally: Tally, mode: GenerationMode, examples: int) -> None:
    op_id = op.definition.raw.get("operationId", op.label)
    headers = _headers(op, target.auth)
    bad_credential_tried = mode is GenerationMode.NEGATIVE or not headers

    @given(case=op.as_strategy(mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: Any) -> None:
        nonlocal bad_credential_tried
        _pin_project(case, target.project_id, op_id)
        if not bad_credential_tried:
            # Once per operation, the same request with a credential that is not valid: the
            # 401 it answers must be one the operation lists.
            bad_credential_tried = True
            response = case.call(
                base_url=target.base_url, session=target.session, headers=BAD_CREDENTIAL, timeout=30
            )
            _check(op_id, case, response, target, tally)
        response = case.call(base_url=target.base_url, session=target.session, headers=headers, timeout=30)
        _check(op_id, case, response, target, tally)

    # Recorded in the tally (schemathesis raises a BaseExceptionGroup); go on with the next one.
    with contextlib.suppress(Exception, BaseExceptionGroup):
        exercise()


# A well-formed key that does not exist: the server looks it up and refuses it.
BAD_CREDENTIAL = {"Authorization": "Bearer flx_live_" + "0" * 49}


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _run(schema: Any, target: Target) -> Tally:
    tally = Tally()
    for op in sorted((r.ok() for r in schema.get_all_operations()), key=_order):
        tally.operations += 1
        started, before = time.monotonic(), tally.responses
        slow = op.definition.raw.get("operationId") in SLOW
        _exercise(op, target, tally, GenerationMode.POSITIVE, 2 if slow else MAX_EXAMPLES)
        if op.definition.raw.get("parameters") or "requestBody" in op.definition.raw:
            # Input the schema forbids: the 400s (and 404s) must be documented ones too.
            _exercise(op, target, tally, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
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
        f"statuses {dict(sorted(tally.statuses.items()))}; codes {dict(sorted(tally.codes.items()))}"
    )
    assert tally.operations >= 100
    assert tally.responses >= tally.operations
    # The run answers errors, not only successes: each of these was checked against the
    # operation's own list of codes.
    for code in ("AUTH_REQUIRED", "VALIDATION_ERROR", "NOT_FOUND"):
        assert tally.codes.get(code, 0) >= 5, (code, tally.codes)
    assert not tally.failures, "\n".join(tally.failures)


# --- Stateful: the document's links, followed with the ids the API really returned -------------

# The operations the links join (http.openapi.LINKS), and nothing else.
STATEFUL_OPS = [
    "createProject",
    "getProject",
    "listApiKeys",
    "createApiKey",
    "rotateApiKey",
    "revokeApiKey",
    "createWebhook",
    "getWebhook",
    "updateWebhook",
    "listWebhookDeliveries",
    "deleteWebhook",
]
# The SSRF guard refuses private addresses, and tests reach only 127.0.0.0/8: the endpoint is
# created disabled, so nothing is ever sent to it (test pings and redelivery are left out here:
# they would send; tests/test_webhooks.py covers them against a local receiver).
HOOK = {"url": "https://1.1.1.1/fluxbase-contract", "events": ["row.inserted"], "enabled": False}
STATEFUL_SCENARIOS = 20
STATEFUL_STEPS = 6


async def test_links_followed_statefully_against_the_live_api(
    instance: Instance, project: ProjectCtx
) -> None:
    """Scenarios of linked calls (create project -> get it, its keys; create key -> rotate,
    revoke it; create webhook -> get, update, deliveries, delete): every answer passes the same
    checks as above, and the linked calls reach real resources (a 2xx where only the id a link
    carried can exist)."""
    from schemathesis.config._phases import InferenceConfig
    from schemathesis.generation.stateful.state_machine import StepInput, StepOutput

    doc = await _document(instance)
    # createProject's body names a cluster (`clusterId`), which schemathesis reads as a foreign key
    # to a resource nothing here creates, so it would never start a scenario with it. Its body is
    # replaced below anyway: only the name is described to the generator.
    doc["paths"]["/api/projects"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    }
    schema = schemathesis.openapi.from_dict(doc).include(operation_id=STATEFUL_OPS)
    schema.config.seed = SEED
    schema.config.phases.stateful.inference = InferenceConfig(algorithms=[])  # the document's links only
    target = Target(
        instance.url,
        {"apiKey": project.admin_key, "dashboardSession": project.owner_token},
        project.id,
        _secrets(instance),
    )
    tally = Tally()
    linked_ok: dict[str, int] = {}

    class Scenario(schema.as_state_machine()):  # type: ignore[misc]
        def step(self, step_input: StepInput) -> StepOutput:
            op_id = step_input.case.operation.definition.raw["operationId"]
            if step_input.case.headers:  # a generated credential would replace the session below
                step_input.case.headers = {
                    k: v for k, v in step_input.case.headers.items() if k.lower() != "authorization"
                }
            if step_input.transition is None:
                # A scenario's first call creates something real, in the test's project.
                if op_id == "createProject":
                    step_input.case.body = {"name": "contract-stateful"}
                elif op_id == "createApiKey":
                    step_input.case.path_parameters = {"project_id": target.project_id}
            if op_id == "createApiKey":
                step_input.case.body = {"name": "contract", "scope": "read"}
            elif op_id == "createWebhook":
                step_input.case.body = {"projectId": target.project_id, **HOOK}
            elif op_id == "updateWebhook" and isinstance(step_input.case.body, dict):
                step_input.case.body.pop("url", None)  # only an address the guard accepts
                step_input.case.body["enabled"] = False
            output: StepOutput = super().step(step_input)
            if (
                step_input.transition is not None
                and step_input.applied_parameters
                and output.response.status_code < 300
            ):
                linked_ok[op_id] = linked_ok.get(op_id, 0) + 1
            return output

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {
                "base_url": target.base_url,
                "session": target.session,
                # The owner's session: it may act on the projects the scenarios create too.
                "headers": {"Authorization": f"Bearer {target.auth['dashboardSession']}"},
                "timeout": 30,
            }

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            op_id = case.operation.definition.raw["operationId"]
            # Recorded, not raised: a failure would make Hypothesis shrink for a long time.
            with contextlib.suppress(Exception, BaseExceptionGroup):
                _check(op_id, case, response, target, tally)

    started = time.monotonic()
    run_settings = settings(
        max_examples=STATEFUL_SCENARIOS,
        stateful_step_count=STATEFUL_STEPS,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    await asyncio.to_thread(Scenario.run, settings=run_settings)
    elapsed = time.monotonic() - started
    print(
        f"\nschemathesis stateful: {tally.responses} responses in {elapsed:.1f} s; "
        f"statuses {dict(sorted(tally.statuses.items()))}; linked 2xx {dict(sorted(linked_ok.items()))}"
    )
    assert not tally.failures, "\n".join(tally.failures)
    # Random ids find nothing: a 2xx here means the link carried a real id from the answer before.
    assert linked_ok.get("getProject", 0) + linked_ok.get("listApiKeys", 0) >= 1, linked_ok
    assert linked_ok.get("revokeApiKey", 0) + linked_ok.get("rotateApiKey", 0) >= 1, linked_ok
    assert linked_ok.get("getWebhook", 0) + linked_ok.get("deleteWebhook", 0) >= 1, linked_ok
    assert elapsed < 60, elapsed


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
    catalog = _catalog()
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
                not set(_codes(op, s)) <= catalog.get(int(s), set()) or not _codes(op, s) for s in errors
            ):
                no_errors.append(op_id)
            if "security" not in op:
                no_security.append(op_id)
    assert count >= 100
    assert not no_body, no_body
    assert not no_errors, no_errors
    assert not no_security, no_security
    assert not untyped, untyped


def _catalog() -> dict[int, set[str]]:
    """Every code of fluxbase.errors by the statuses it is answered with."""
    from fluxbase.errors import FluxbaseError

    out: dict[int, set[str]] = {}
    todo = [FluxbaseError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        out.setdefault(cls.status, set()).add(cls.code)
    return out


def _codes(op: dict[str, Any], status: str) -> list[str]:
    """The codes an operation documents for an error status."""
    schema = op["responses"][status]["content"]["application/json"]["schema"]
    assert schema["required"] == ["success", "error"], schema
    codes: list[str] = schema["properties"]["error"]["properties"]["code"]["enum"]
    return codes


async def test_each_operation_lists_only_the_codes_it_can_answer(instance: Instance) -> None:
    """Derived per operation (http.error_codes), not every code of the status: the health
    checks answer no 401, a dashboard-session route no project error, webhooks no storage code."""
    doc = await _document(instance)
    ops = {
        op["operationId"]: op
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }

    def listed(op_id: str) -> set[str]:
        op = ops[op_id]
        return {c for s in op["responses"] if s[0] in "45" for c in _codes(op, s)}

    everything = {c for codes in _catalog().values() for c in codes}
    assert listed("live") == {"INTERNAL_ERROR", "DATABASE_CONNECTION_ERROR"}
    assert "401" not in ops["ready"]["responses"]
    assert {"AUTH_REQUIRED", "PROJECT_NOT_FOUND", "INSUFFICIENT_PERMISSIONS", "RATE_LIMIT"} <= listed(
        "createWebhook"
    )
    assert not listed("createWebhook") & {"STORAGE_QUOTA_EXCEEDED", "INVITATION_EXPIRED", "CLUSTER_IN_USE"}
    assert {"STORAGE_QUOTA_EXCEEDED", "UNSUPPORTED_MEDIA_TYPE", "STORAGE_UNAVAILABLE"} <= listed("uploadFile")
    assert "INVITATION_EXPIRED" in listed("answerInvite")
    assert "PROJECT_NOT_FOUND" not in listed("listProjects")
    assert "CLUSTER_IN_USE" in listed("removeCluster")
    # Each operation lists fewer codes than the catalog holds: nothing lists everything.
    assert all(listed(op_id) < everything for op_id in ops)


async def test_links_name_real_operations_and_their_parameters(instance: Instance) -> None:
    doc = await _document(instance)
    ops = {
        op["operationId"]: op
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    links = [
        (op_id, name, link)
        for op_id, op in ops.items()
        for response in op["responses"].values()
        for name, link in response.get("links", {}).items()
    ]
    assert len(links) >= 10
    for op_id, name, link in links:
        target = ops[link["operationId"]]
        path_params = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) == path_params, (op_id, name)
        for value in link["parameters"].values():
            assert value.startswith(("$response.body#/", "$request.path.")), (op_id, name, value)


async def test_webhook_log_answers_are_typed(instance: Instance) -> None:
    """The delivery log (every attempt: time, status, response time, error, body), the queue and
    the project log are described field by field, with the names the JSON has."""
    doc = await _document(instance)
    schemas = doc["components"]["schemas"]

    def props(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    assert {"at", "responseStatus", "responseTimeMs", "responseBody", "error"} == props("DeliveryAttempt")
    assert {"messageId", "status", "attempts", "attemptLog", "payload", "nextRetryAt"} <= props("DeliveryOut")
    assert {"pending", "blocked", "reason", "blockedBy", "lastError", "nextRetryAt"} == props("WebhookQueue")
    assert {"id", "level", "source", "message", "details", "createdAt"} == props("ProjectLogEntry")


def test_the_reader_follows_calls_methods_and_annotations(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.error_codes finds an error raised two calls away, through an annotated parameter's
    method and a subclass's override, and not one that is only caught."""
    from fluxbase.errors import Conflict, NotFound, RateLimited
    from fluxbase.http import error_codes

    monkeypatch.setattr(error_codes, "ROOTS", {"fluxbase", __name__.split(".")[0]})
    assert error_codes.raised_by(_handler) == {Conflict, RateLimited}
    assert NotFound not in error_codes.raised_by(_handler)


class _Store:
    async def put(self) -> None: ...


class _S3Store(_Store):
    async def put(self) -> None:
        from fluxbase.errors import Conflict

        raise Conflict()


async def _helper(store: _Store) -> None:
    await store.put()


async def _handler(store: _Store) -> None:
    from fluxbase.errors import NotFound, RateLimited

    try:
        await _helper(store)
    except NotFound:
        raise RateLimited(1) from None


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
