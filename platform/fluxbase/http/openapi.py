"""The OpenAPI pages (/schema: Redoc; /schema/swagger: Swagger UI) from assets inside the package.

Litestar's render plugins load their JavaScript, fonts and favicon from CDNs by default, so the
pages were blank offline. Here every URL they use is served by this API from
`openapi_assets/` (pinned versions, checksums and licences in `openapi_assets/LICENSES.txt`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)

from fluxbase.errors import FluxbaseError, NotFound
from fluxbase.http.error_codes import by_operation, transport_errors

SCHEMA_PATH = "/schema"
ASSETS = f"{SCHEMA_PATH}/assets"

_TYPES = {
    "redoc.standalone.js": "text/javascript",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "LICENSES.txt": "text/plain; charset=utf-8",
    "redoc.standalone.js.LICENSE.txt": "text/plain; charset=utf-8",
    "swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
    "swagger-ui-standalone-preset.js.LICENSE.txt": "text/plain; charset=utf-8",
}
# No favicon request at all (Litestar's default points at a CDN).
_NO_FAVICON = "<link rel='icon' href='data:,'>"


def openapi_config(title: str, version: str) -> OpenAPIConfig:
    """Redoc at /schema and /schema/redoc, Swagger UI at /schema/swagger, plus the JSON and YAML."""
    return OpenAPIConfig(
        title=title,
        version=version,
        path=SCHEMA_PATH,
        render_plugins=[
            _Redoc(
                path=["/", "/redoc"],
                js_url=f"{ASSETS}/redoc.standalone.js",
                google_fonts=False,
                favicon=_NO_FAVICON,
            ),
            _Swagger(
                path="/swagger",
                js_url=f"{ASSETS}/swagger-ui-bundle.js",
                css_url=f"{ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
                favicon=_NO_FAVICON,
            ),
            _Json(path="/openapi.json"),
            _Yaml(path=["/openapi.yaml", "/openapi.yml"]),
        ],
    )


@cache
def _asset(name: str) -> bytes:
    return resources.files("fluxbase.http").joinpath("openapi_assets", name).read_bytes()


@get(f"{ASSETS}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def openapi_asset(name: str) -> Response[bytes]:
    """One vendored file of the OpenAPI pages (a fixed list: no path from the request is opened)."""
    media_type = _TYPES.get(name)
    if media_type is None:
        raise NotFound("No such asset.")
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})


# --- The parts of the contract Litestar cannot infer from a handler's signature -----------------
#
# Litestar documents what a handler's annotations say. The rest is added here, once, to the
# generated document: the security schemes and each operation's security, the error envelope
# with the codes of the catalog (fluxbase.errors) each operation can answer (derived from its code
# by http.error_codes), the links between operations, and the bodies of the routes that read
# their body themselves (SQL, data, uploads, imports: they stream or decode it on a hot path;
# `/api/execute-sql` is usually answered by http.fastpath before Litestar).

API_KEY = "apiKey"
SESSION = "dashboardSession"
PROJECT_USER = "projectUserToken"

SECURITY_SCHEMES: dict[str, Any] = {
    API_KEY: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "fb_<scope>_<key>",
        "description": "A project API key (Authorization: Bearer fb_...); its scope limits what it may do.",
    },
    SESSION: {
        "type": "http",
        "scheme": "bearer",
        "description": "A dashboard session token from POST /api/auth/login.",
    },
    PROJECT_USER: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A project end user's access token from POST /api/projects/{id}/auth/login.",
    },
}

# Operations anyone may call (no credential), and those only a dashboard session may call.
PUBLIC = frozenset(
    {
        "live",
        "ready",
        "register",
        "login",
        "recoverAccount",
        "resetAccountPassword",
        "adminStatus",
        "getPublicFile",
        "projectUserRegister",
        "projectUserLogin",
        "projectUserRefresh",
        "projectUserRequestVerification",
        "projectUserVerifyEmail",
        "projectUserRecover",
        "projectUserResetPassword",
        "projectUserMagicLink",
        "projectUserMagicLinkLogin",
        "projectUserConfirmEmailChange",
    }
)
# Operations of a project's end user, with the user's own access token.
PROJECT_USER_ONLY = frozenset({"projectUserLogout", "projectUserMe", "projectUserRequestEmailChange"})
SESSION_ONLY = frozenset(
    {
        "logout",
        "me",
        "createProject",
        "listProjects",
        "listMyInvites",
        "answerInvite",
        "listAllProjects",
        "setQuotas",
        "suspendProject",
        "resumeProject",
        "importProject",
    }
)


# OpenAPI links (clients and schemathesis's stateful run follow them): what a created resource's
# id lets you call next. By operation and success status: link name -> target and parameters.
def _link(op_id: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": op_id, "parameters": parameters}


_PROJECT = "$response.body#/project/id"
_WEBHOOK = "$response.body#/webhook/id"
_KEY = {"project_id": "$request.path.project_id", "key_id": "$response.body#/apiKey/id"}
LINKS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("createProject", "201"): {
        "GetProject": _link("getProject", project_id=_PROJECT),
        "ListApiKeys": _link("listApiKeys", project_id=_PROJECT),
        "CreateApiKey": _link("createApiKey", project_id=_PROJECT),
    },
    ("createApiKey", "201"): {
        "RotateApiKey": _link("rotateApiKey", **_KEY),
        "RevokeApiKey": _link("revokeApiKey", **_KEY),
    },
    ("createWebhook", "201"): {
        "GetWebhook": _link("getWebhook", webhook_id=_WEBHOOK),
        "UpdateWebhook": _link("updateWebhook", webhook_id=_WEBHOOK),
        "TestWebhook": _link("testWebhook", webhook_id=_WEBHOOK),
        "ListWebhookDeliveries": _link("listWebhookDeliveries", webhook_id=_WEBHOOK),
        "DeleteWebhook": _link("deleteWebhook", webhook_id=_WEBHOOK),
    },
    ("testWebhook", "200"): {
        "RedeliverWebhook": _link(
            "redeliverWebhook",
            webhook_id="$request.path.webhook_id",
            delivery_id="$response.body#/delivery/id",
        ),
    },
}

# Operations that answer bytes, not JSON: their media type.
BINARY_ANSWERS = {"exportProject": "application/sql", "getPublicFile": "*/*"}

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_STATUS_TEXT = {
    400: "The request is not valid",
    401: "No valid credential",
    403: "The credential may not do this",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    413: "Too large",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "The database cluster could not be verified",
    429: "Rate limited",
    500: "Unexpected server error",
    503: "A dependency is unavailable; retry",
    504: "Timed out",
}


def error_schema(codes: list[str]) -> dict[str, Any]:
    """The `{success: false, error: {code, message}}` envelope, with the codes a status carries."""
    return {
        "type": "object",
        "required": ["success", "error"],
        "properties": {
            "success": {"type": "boolean", "enum": [False]},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {"type": "string"},
                },
            },
        },
    }


def _responses(errors: set[type[FluxbaseError]]) -> dict[int, list[str]]:
    """The codes of the errors by HTTP status (errors answered with 200, like SQL's, are not)."""
    by_status: dict[int, set[str]] = {}
    for cls in errors:
        if cls.status >= 400:
            by_status.setdefault(cls.status, set()).add(cls.code)
    return {status: sorted(codes) for status, codes in sorted(by_status.items())}


def complete_document(
    doc: dict[str, Any],
    bodies: dict[str, tuple[str, dict[str, Any]]],
    successes: dict[str, dict[str, Any]],
    components: dict[str, Any],
    raised: dict[str, set[type[FluxbaseError]]],
) -> dict[str, Any]:
    """Add security, error responses and the hand-read bodies to Litestar's document (in place)."""
    comp = doc.setdefault("components", {})
    if "securitySchemes" in comp:
        return doc  # done already (the rendered document is built once and cached)
    comp["securitySchemes"] = SECURITY_SCHEMES
    schemas = comp.setdefault("schemas", {})
    for name, schema in components.items():
        if schemas.setdefault(name, schema) != schema:
            raise RuntimeError(f"two different schemas are named {name}")
    for path_item in doc.get("paths", {}).values():
        for method in _METHODS:
            op = path_item.get(method)
            if op is None:
                continue
            op_id = op.get("operationId", "")
            if op_id in bodies:
                media_type, schema = bodies[op_id]
                op["requestBody"] = {"required": True, "content": {media_type: {"schema": schema}}}
            if op_id in BINARY_ANSWERS:
                binary = {"schema": {"type": "string", "format": "binary"}}
                for status, response in op.get("responses", {}).items():
                    if status.startswith("2"):
                        response["content"] = {BINARY_ANSWERS[op_id]: binary}
            if op_id in successes:
                for status, response in op.get("responses", {}).items():
                    if status.startswith("2"):
                        response["content"] = {"application/json": {"schema": successes[op_id]}}
            if op_id in PUBLIC:
                op["security"] = []
            elif op_id in PROJECT_USER_ONLY:
                op["security"] = [{PROJECT_USER: []}]
            elif op_id in SESSION_ONLY:
                op["security"] = [{SESSION: []}]
            else:
                op["security"] = [{API_KEY: []}, {SESSION: []}]
            for status, response in op.get("responses", {}).items():
                if (op_id, status) in LINKS:
                    response["links"] = LINKS[op_id, status]
            params = op.get("parameters") or []
            has_path = any(p.get("in") == "path" for p in params)
            found = raised.get(op_id, set()) | transport_errors(bool(params), has_path, "requestBody" in op)
            responses = op.setdefault("responses", {})
            for status, codes in _responses(found).items():
                responses[str(status)] = {
                    "description": _STATUS_TEXT.get(status, "Error") + f": {', '.join(codes)}.",
                    "content": {"application/json": {"schema": error_schema(codes)}},
                }
    return doc


def _hand_read() -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, dict[str, Any]], dict[str, Any]]:
    """The bodies (and answers) of the routes that read their body themselves, as schemas."""
    from fluxbase.http.controllers import end_users, sql
    from fluxbase.http.shapes import hand_read_shapes

    bodies, successes = hand_read_shapes(sql.ExecuteSqlBody, sql.ExecuteBatchBody)
    bodies["updateProjectAuthSettings"] = ("application/json", end_users.AuthSettingsPatch)
    types = [t for _, t in bodies.values() if isinstance(t, type)]
    types += [t for ts in successes.values() for t in ts]
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, refs, strict=True))

    def schema(t: Any) -> dict[str, Any]:
        return schema_of[t] if isinstance(t, type) else dict(t)

    return (
        {op: (media, schema(t)) for op, (media, t) in bodies.items()},
        {op: {"anyOf": [schema_of[t] for t in ts]} for op, ts in successes.items()},
        components,
    )


def completed(doc: dict[str, Any], app: Any) -> dict[str, Any]:
    if "securitySchemes" in doc.get("components", {}):
        return doc
    bodies, successes, components = _hand_read()
    return complete_document(doc, bodies, successes, components, by_operation(app))


class _Json(JsonRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, completed(openapi_schema, request.app))


class _Yaml(YamlRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, completed(openapi_schema, request.app))


class _Redoc(RedocRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, completed(openapi_schema, request.app))


class _Swagger(SwaggerRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, completed(openapi_schema, request.app))
