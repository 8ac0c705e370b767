"""Wire shapes: request Structs (camelCase, as in the reference doc) and response builders."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar

import msgspec

from fluxbase.errors import ValidationError
from fluxbase.services.access import Project
from fluxbase.services.accounts import User
from fluxbase.services.apikeys import ApiKey

# The one wording of a body that is not JSON (http.edge and the SQL fast path say the same).
NOT_JSON = "The request body must be JSON."
# msgspec raises RecursionError (not a DecodeError) on JSON nested deeper than the interpreter allows.
TOO_DEEP = "The request body is nested too deeply."


class Body(msgspec.Struct, rename="camel", forbid_unknown_fields=False):
    """Base for JSON request bodies."""


T = TypeVar("T")


def decode_body(raw: bytes, cls: type[T]) -> T:
    """A body a route reads itself (streamed, optional or raw JSON), decoded with the same errors
    as a Litestar `data:` body: 400 VALIDATION_ERROR with msgspec's message, or "must be JSON"."""
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as exc:
        raise ValidationError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationError(NOT_JSON) from None
    except RecursionError:
        raise ValidationError(TOO_DEEP) from None


class RegisterBody(Body):
    email: str
    password: str
    display_name: str = ""


class LoginBody(Body):
    email: str
    password: str


class CreateProjectBody(Body):
    name: str
    cluster_id: str | None = None  # instance admins only (services.clusters)


class CreateKeyBody(Body):
    name: str
    scope: str
    expires_in_days: int | None = None
    allowed_origins: list[str] = []
    rate_limit_requests: int | None = None
    rate_limit_window_seconds: int | None = None
    require_user_auth: bool = False


class Out(msgspec.Struct, rename="camel"):
    """Base for response Structs: camelCase on the wire, fields in the order the wire has them."""


class Answer(Out, kw_only=True):
    """Base for a success answer: `success` first, as on the wire (subclasses say kw_only=True,
    else msgspec puts their own fields before it)."""

    success: bool = True


class Ok(Answer, kw_only=True):
    """An answer with nothing but success."""


class UserOut(Out):
    id: str
    email: str
    display_name: str
    is_instance_admin: bool
    created_at: datetime


class ProjectOut(Out, omit_defaults=True):
    """A project; `role` (the caller's) only where the caller is a member."""

    id: str
    name: str
    status: str
    read_only: bool
    created_at: datetime
    role: str | None = None


class ApiKeyOut(Out):
    id: str
    project_id: str
    name: str
    prefix: str
    scope: str
    allowed_origins: list[str]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    require_user_auth: bool


def user_out(u: User) -> UserOut:
    return UserOut(u.id, u.email, u.display_name, u.is_instance_admin, u.created_at)


def project_out(p: Project, role: str | None = None) -> ProjectOut:
    return ProjectOut(p.id, p.name, p.status, p.read_only, p.created_at, role)


def key_out(k: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        k.id,
        k.project_id,
        k.name,
        k.prefix,
        k.scope,
        k.allowed_origins,
        k.created_at,
        k.last_used_at,
        k.expires_at,
        k.revoked_at,
        k.require_user_auth,
    )


class UserAnswer(Answer, kw_only=True):
    user: UserOut


class LoginAnswer(Answer, kw_only=True):
    token: str
    expires_at: int
    user: UserOut


class MessageAnswer(Answer, kw_only=True):
    message: str


class ResetAnswer(Answer, kw_only=True):
    revoked_sessions: int


class AdminStatusAnswer(Answer, kw_only=True):
    admin_exists: bool
    registration_open: bool


class ProjectAnswer(Answer, kw_only=True):
    project: ProjectOut


class ProjectsAnswer(Answer, kw_only=True):
    projects: list[ProjectOut]


class ProjectDeleted(Answer, kw_only=True):
    project_id: str


class KeyCreated(Answer, kw_only=True):
    """The one answer that carries a raw key (create and rotate)."""

    key: str
    api_key: ApiKeyOut


class KeysAnswer(Answer, kw_only=True):
    api_keys: list[ApiKeyOut]


class KeyAnswer(Answer, kw_only=True):
    api_key: ApiKeyOut


# --- Shapes of the routes that read their body themselves (documented, not decoded, here) ------


class SqlResult(msgspec.Struct, rename="camel"):
    rows: list[Any]
    columns: list[str]
    row_count: int
    message: str | None
    truncated: bool


class SqlExecutionInfo(msgspec.Struct, rename="camel"):
    time: str
    time_ms: float
    row_count: int
    operation: str


class SqlAnswer(msgspec.Struct, rename="camel"):
    """execute-sql's 200 when the statement ran."""

    success: bool
    result: SqlResult
    execution_info: SqlExecutionInfo


class SqlFailure(msgspec.Struct):
    message: str
    code: str
    details: str
    statementIndex: int | None = None  # execute-batch: the failing statement


class SqlFailed(msgspec.Struct):
    """execute-sql's and execute-batch's 200 when the statement failed (the SQL envelope)."""

    success: bool
    error: SqlFailure


class BatchExecutionInfo(msgspec.Struct, rename="camel"):
    time: str
    time_ms: float
    statements: int
    row_count: int
    operations: list[str]


class BatchAnswer(msgspec.Struct, rename="camel"):
    success: bool
    results: list[SqlResult]
    execution_info: BatchExecutionInfo


class DataColumn(msgspec.Struct, rename="camel"):
    name: str
    type: str
    nullable: bool
    default: str | None
    primary_key: bool
    identity: Literal["always", "by default"] | None
    generated: bool


class DataIndex(msgspec.Struct):
    name: str
    unique: bool
    primary: bool
    sql: str


class DataRls(msgspec.Struct):
    enabled: bool
    forced: bool


class DataTable(msgspec.Struct, rename="camel"):
    """A table as services.data.Table.out() writes it."""

    name: str
    columns: list[DataColumn]
    primary_key: list[str]
    indexes: list[DataIndex]
    rls: DataRls
    sql: str


class DataTables(msgspec.Struct):
    """GET /api/schema and /api/projects/{id}/tables: every table, its columns, indexes and RLS."""

    success: bool
    tables: list[DataTable]


class DataTableCreated(msgspec.Struct):
    success: bool
    table: DataTable


class DataRecordsPage(msgspec.Struct, rename="camel"):
    success: bool
    records: list[dict[str, Any]]
    count: int
    limit: int
    offset: int
    has_more: bool
    truncated: bool


class DataRecordsInserted(msgspec.Struct):
    """`record` too when one object was sent."""

    success: bool
    records: list[dict[str, Any]]
    count: int
    record: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class DataRecord(msgspec.Struct):
    success: bool
    record: dict[str, Any]


_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_MULTIPART: dict[str, Any] = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "bucketId": {"type": "string", "description": "UUID or name"},
        "projectId": {"type": "string"},
    },
}


def hand_read_shapes(
    execute_sql: type, execute_batch: type
) -> tuple[dict[str, tuple[str, Any]], dict[str, list[type]]]:
    """Per operation id: (media type, Struct or JSON schema) of the body; the 2xx answer's Structs
    (these routes encode their answer once, on the SQL hot path, so the Structs only document it)."""
    from fluxbase.services.data import TableDef

    bodies: dict[str, tuple[str, Any]] = {
        "executeSql": ("application/json", execute_sql),
        "executeBatch": ("application/json", execute_batch),
        "createTable": ("application/json", TableDef),
        "createRecords": (
            "application/json",
            {"oneOf": [_OBJECT, {"type": "array", "items": _OBJECT}]},
        ),
        "updateRecord": ("application/json", _OBJECT),
        "setQuotas": ("application/json", _OBJECT),
        "uploadFile": ("multipart/form-data", _MULTIPART),
        "importProject": ("application/sql", {"type": "string", "format": "binary"}),
    }
    successes: dict[str, list[type]] = {
        "executeSql": [SqlAnswer, SqlFailed],
        "executeBatch": [BatchAnswer, SqlFailed],
        "getSchema": [DataTables],
        "listTables": [DataTables],
        "createTable": [DataTableCreated],
        "listRecords": [DataRecordsPage],
        "createRecords": [DataRecordsInserted],
        "getRecord": [DataRecord],
        "updateRecord": [DataRecord],
        "deleteRecord": [DataRecord],
    }
    return bodies, successes
