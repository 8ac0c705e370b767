"""The one catalog of stable error codes; the HTTP edge maps them to responses once."""

from __future__ import annotations

from typing import Any, ClassVar


class FluxbaseError(Exception):
    """A public-safe error: `code`, HTTP `status` and a message fit for a response body."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "Unexpected server error."

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.extra)
        return {"success": False, "error": error}


class ValidationError(FluxbaseError):
    code, status, default_message = "VALIDATION_ERROR", 400, "The request is not valid."


class AuthRequired(FluxbaseError):
    code, status = "AUTH_REQUIRED", 401
    default_message = "API key missing or malformed. Include Authorization: Bearer <key>."


class TokenExpired(FluxbaseError):
    code, status, default_message = "TOKEN_EXPIRED", 401, "Session token has expired. Re-authenticate."


class ScopeMismatch(FluxbaseError):
    code, status = "SCOPE_MISMATCH", 403
    default_message = "This credential does not have access to this project or resource."


class OriginNotAllowed(FluxbaseError):
    code, status = "ORIGIN_NOT_ALLOWED", 403
    default_message = "Request Origin is not permitted for this key."


class ProjectSuspended(FluxbaseError):
    code, status, default_message = "PROJECT_SUSPENDED", 403, "Project is suspended."


class InsufficientPermissions(FluxbaseError):
    code, status, default_message = "INSUFFICIENT_PERMISSIONS", 403, "Only admins can perform this action."


class RegistrationClosed(FluxbaseError):
    code, status, default_message = "REGISTRATION_CLOSED", 403, "Self-registration is disabled."


class ProjectNotFound(FluxbaseError):
    code, status = "PROJECT_NOT_FOUND", 404
    default_message = "No project found for the given projectId."


class UserNotFound(FluxbaseError):
    code, status, default_message = "USER_NOT_FOUND", 404, "No such user."


class NotFound(FluxbaseError):
    code, status, default_message = "NOT_FOUND", 404, "Not found."


class MethodNotAllowed(FluxbaseError):
    code, status, default_message = "METHOD_NOT_ALLOWED", 405, "This method is not allowed on this route."


class Conflict(FluxbaseError):
    code, status, default_message = "CONFLICT", 409, "The resource already exists or is in use."


class PayloadTooLarge(FluxbaseError):
    code, status, default_message = "PAYLOAD_TOO_LARGE", 413, "The request is too large."


class QuotaExceeded(FluxbaseError):
    code, status, default_message = "STORAGE_QUOTA_EXCEEDED", 413, "The project's storage quota is used up."


class UnsupportedMediaType(FluxbaseError):
    code, status, default_message = "UNSUPPORTED_MEDIA_TYPE", 415, "This content type is not accepted here."


class RangeNotSatisfiable(FluxbaseError):
    code, status, default_message = "RANGE_NOT_SATISFIABLE", 416, "The requested range is not satisfiable."


class RateLimited(FluxbaseError):
    code, status = "RATE_LIMIT", 429
    default_message = "Too many requests. Retry later with exponential backoff."

    def __init__(self, retry_after: int, message: str | None = None, *, quota: Any = None) -> None:
        headers = {"Retry-After": str(max(1, retry_after))}
        if quota is not None:  # ratelimit.Quota: X-RateLimit-Limit/Remaining/Reset
            headers.update(quota.headers())
        super().__init__(message, headers=headers)
        self.retry_after = retry_after


class InternalError(FluxbaseError):
    pass


class DatabaseUnavailable(FluxbaseError):
    code, status = "DATABASE_CONNECTION_ERROR", 503
    default_message = "Transient database connectivity issue. Retry after a few seconds."


class SessionStatementsLost(DatabaseUnavailable):
    """The pooled session's prepared statements were dropped or replaced by SQL of the project
    (`DEALLOCATE` or `PREPARE` in a `DO` block's dynamic SQL): the session was closed, nothing of
    the request committed, and the statement's name is not repeated (tenancy.errors.TAMPERED)."""

    default_message = (
        "The database session's prepared statements were dropped by SQL of this project "
        "(DEALLOCATE or PREPARE in dynamic SQL); nothing was committed. Retry the request."
    )


class ResultTypeChanged(DatabaseUnavailable):
    """A composite type in a statement's result changed (ALTER TYPE) after the session had cached
    it: the driver cannot read the rows. On the one-round-trip path the statement's transaction
    has ended by then, so a request that could write is not run again (hostile review 28); the
    session's type cache is reloaded and the session kept."""

    default_message = (
        "A type in the statement's result changed while it ran (ALTER TYPE), so its result could "
        "not be read. The statement ran; run it again to read the result."
    )


class ConnectionsBusy(DatabaseUnavailable):
    """Every connection of the project's pool stayed in use for the acquire timeout."""

    default_message = "All database connections of this project are busy. Retry in a second."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class StorageUnavailable(FluxbaseError):
    code, status = "STORAGE_UNAVAILABLE", 503
    default_message = "Object storage is unreachable. Retry after a few seconds."


class InvitationExpired(FluxbaseError):
    code, status = "INVITATION_EXPIRED", 410
    default_message = "This invitation has expired. Ask a project admin to invite you again."


# SQL failures on the REST data endpoints (records, tables): the same code and `details`
# (SQLSTATE) as /api/execute-sql, with an HTTP status that says what kind of failure it was.
class SqlExecFailed(FluxbaseError):
    code, status, default_message = "SQL_EXEC_ERROR", 400, "The statement failed."


class SqlConflict(SqlExecFailed):
    status = 409


class SqlForbidden(SqlExecFailed):
    status = 403


class StatementFailed(FluxbaseError):
    """A tenant statement (or its COMMIT) failed and its transaction was rolled back.

    /api/execute-sql and /api/execute-batch answer it with 200 and the SQL envelope (the
    reference's SQL_EXEC_ERROR: `details` carries the SQLSTATE); the REST data endpoints map it
    to an HTTP status by SQLSTATE (tenancy.errors.rest_error)."""

    code, status, default_message = "SQL_EXEC_ERROR", 200, "The statement failed."

    def __init__(self, message: str, sqlstate: str, index: int | None = None) -> None:
        super().__init__(message, extra={"details": f"ERROR:  {sqlstate}"})
        self.sqlstate, self.index = sqlstate, index


class StatementTimedOut(StatementFailed):
    """The statement ran past the request deadline or the role's statement_timeout (57014)."""

    code = "QUERY_TIMEOUT"


class QueryTimeout(FluxbaseError):
    code, status, default_message = "QUERY_TIMEOUT", 504, "The request deadline passed."


# -- project operations (migrations, export/import, read-only, quotas) -------------------------


class ProjectReadOnly(FluxbaseError):
    code, status = "PROJECT_READ_ONLY", 403
    default_message = "Project is read-only: writes are refused until an admin switches read-only off."


class DatabaseQuotaExceeded(FluxbaseError):
    code, status = "DATABASE_QUOTA_EXCEEDED", 413
    default_message = "The project's database size limit is reached. Delete rows and vacuum to shrink."


class MigrationChecksumMismatch(FluxbaseError):
    code, status = "MIGRATION_CHECKSUM_MISMATCH", 409
    default_message = "A migration with this name was already applied with different SQL."


class MigrationFailed(FluxbaseError):
    code, status, default_message = "MIGRATION_FAILED", 400, "The migration failed; nothing was applied."


class ImportIntegrityError(FluxbaseError):
    code, status = "IMPORT_INTEGRITY_ERROR", 400
    default_message = "The file is not a complete Fluxbase export (header or checksum does not match)."


class ImportRefused(FluxbaseError):
    code, status = "IMPORT_REFUSED", 400
    default_message = "The dump contains a statement that reaches outside the project's schema."


class ImportFailed(FluxbaseError):
    code, status, default_message = "IMPORT_FAILED", 400, "The import failed; no project was created."


class ExportUnavailable(FluxbaseError):
    code, status, default_message = "EXPORT_UNAVAILABLE", 503, "The export could not be started."


class InvalidUserToken(FluxbaseError):
    code, status = "INVALID_USER_TOKEN", 401
    default_message = "The end-user token is not valid."


class UserTokenRequired(FluxbaseError):
    code, status = "USER_TOKEN_REQUIRED", 401
    default_message = "This API key requires an end-user token (X-Fluxbase-User-Token)."


class UserDisabled(FluxbaseError):
    code, status, default_message = "USER_DISABLED", 401, "This user account is disabled."


class IdentityProviderUnavailable(FluxbaseError):
    code, status = "IDENTITY_PROVIDER_UNAVAILABLE", 503
    default_message = "The project's JWKS endpoint could not be reached. Retry after a few seconds."


# -- email links (mail/) -------------------------------------------------------------------------


class InvalidEmailToken(FluxbaseError):
    code, status = "INVALID_EMAIL_TOKEN", 400
    default_message = "This link is not valid: it may have expired or been used already. Ask for a new one."


class RedirectNotAllowed(FluxbaseError):
    code, status = "REDIRECT_NOT_ALLOWED", 400
    default_message = "redirectTo is not in the project's list of allowed redirect URLs."


class EmailNotVerified(FluxbaseError):
    code, status = "EMAIL_NOT_VERIFIED", 403
    default_message = "Confirm your email address first: follow the link in the verification email."


class ClusterVerificationFailed(FluxbaseError):
    """A database cluster failed verification (services/clusters.py). The envelope code is
    upper-case like every other code; `details.failure` carries CloudSync's lower-case name
    (`database_unreachable`, …) and `details.retryable` whether trying again may help."""

    failure: ClassVar[str] = "database_error"
    retryable: ClassVar[bool] = False
    code, status, default_message = "DATABASE_ERROR", 422, "The database cluster could not be verified."

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.extra.setdefault("details", {"failure": self.failure, "retryable": self.retryable})


class ClusterUnreachable(ClusterVerificationFailed):
    failure, retryable = "database_unreachable", True
    code, default_message = "DATABASE_UNREACHABLE", "The database cluster is unreachable."


class ClusterAuthFailed(ClusterVerificationFailed):
    failure = "database_auth_failed"
    code, default_message = "DATABASE_AUTH_FAILED", "The database cluster refused the credentials."


class ClusterPermissionDenied(ClusterVerificationFailed):
    failure = "database_permission_denied"
    code, default_message = "DATABASE_PERMISSION_DENIED", "The role lacks privileges Fluxbase needs."


class ClusterVersionUnsupported(ClusterVerificationFailed):
    failure = "database_version_unsupported"
    code, default_message = "DATABASE_VERSION_UNSUPPORTED", "The PostgreSQL version is not supported."


class ClusterAlreadyRegistered(Conflict):
    """The database, or another database of the same PostgreSQL server (same
    `pg_control_system().system_identifier`), is already a cluster or is the control plane's:
    roles are per server, so one server is at most one cluster (docs/clusters.md)."""

    failure: ClassVar[str] = "database_already_registered"
    default_message = (
        "That PostgreSQL server is already in use: it holds a registered cluster or the control "
        "plane. Roles are per server, so register one database per server."
    )

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.extra.setdefault("details", {"failure": self.failure, "retryable": False})


class ClusterNotFound(FluxbaseError):
    code, status, default_message = "CLUSTER_NOT_FOUND", 404, "Database cluster not found."


class ClusterInUse(FluxbaseError):
    code, status = "CLUSTER_IN_USE", 409
    default_message = "Projects still live on this database cluster; move or delete them first."


class ProjectMoving(FluxbaseError):
    code, status = "PROJECT_MOVING", 409
    default_message = (
        "The project is being moved to another database cluster: writes are refused until the move "
        "ends (reads still work). Retry shortly."
    )


class ProjectMoveFailed(FluxbaseError):
    code, status = "PROJECT_MOVE_FAILED", 502
    default_message = (
        "The project could not be copied to the target cluster; it stays on its cluster, writable, "
        "and the partial copy was removed."
    )
