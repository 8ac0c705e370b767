"""Storage: buckets, files, quotas, presigned URLs and orphan housekeeping.

Rows in `fluxbase.buckets` and `fluxbase.objects` say what exists; bytes live in S3 under
`<projectId>/<bucketId>/<name>`. The rules that keep tenants apart and files whole:

- Every S3 key this module sends to S3 is built from a row or from parts validated by
  `storage.rules`, never copied from a request, and every lookup is scoped to the authorised
  project.
- A file becomes visible (status 'ready') only after its bytes are complete in S3. An
  operation in flight holds a *lease* on its row (`lease_id`, `lease_until`): uploads insert
  a 'pending' row (or lease the 'ready' row they replace) before writing to S3, deletes mark
  the row 'deleting' before removing the object. If the process dies, the lease runs out and
  `housekeep` finishes or undoes the work; objects with no row at all are removed too.
- Quota: bytes of all rows plus the reservations of uploads in flight, checked under a
  per-project advisory lock just before an upload is committed.

Streamed uploads are driven by `storage.uploads`; presigned POST uploads are registered by
`confirm_upload`, or by `housekeep` once their form has expired if the client never confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import (
    Conflict,
    FluxbaseError,
    InsufficientPermissions,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RangeNotSatisfiable,
    StorageUnavailable,
    UnsupportedMediaType,
    ValidationError,
)
from fluxbase.services.access import ProjectAccess
from fluxbase.storage.access import StorageAccess
from fluxbase.storage.rules import (
    DEFAULT_CONTENT_TYPE,
    MAX_NAME_BYTES,
    EndUserRules,
    as_uuid,
    check_bucket_name,
    check_content_type,
    check_end_user_rules,
    check_mime_patterns,
    check_object_name,
    decode_cursor,
    encode_cursor,
    end_user_allows,
    end_user_sql,
    mime_allowed,
    object_key,
    parse_object_key,
    size_text,
)
from fluxbase.storage.s3 import ObjectMissing, ObjectStore, s3_errors
from fluxbase.storage.streaming import copy_object

log = logging.getLogger("fluxbase.storage")

STAGING_PREFIX = "_staging/"
# Presigned POST forms upload to `_presigned/<projectId>/<leaseId>`, never to the file's key:
# confirming copies the bytes to the file, and the form is dead from then on (a later POST
# lands where nothing reads it, and housekeeping removes it).
PRESIGNED_PREFIX = "_presigned/"
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
MAX_BULK_DELETE = 1000
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def presigned_key(project_id: str, lease_id: uuid.UUID) -> str:
    """Where a presigned POST form uploads: unique to its lease, never a file's key."""
    return f"{PRESIGNED_PREFIX}{project_id}/{lease_id}"


# ---------------------------------------------------------------------------------------------
# Shapes returned to the HTTP layer


@dataclass(frozen=True)
class Bucket:
    id: str
    project_id: str
    name: str
    is_public: bool
    allowed_mime_types: list[str] | None
    created_at: datetime
    updated_at: datetime
    file_count: int = 0
    size: int = 0
    rules: EndUserRules = field(default_factory=EndUserRules)

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> Bucket:
        types = r["allowed_mime_types"]
        return cls(
            str(r["id"]),
            r["project_id"],
            r["name"],
            r["is_public"],
            list(types) if types is not None else None,
            r["created_at"],
            r["updated_at"],
            r.get("file_count") or 0,
            r.get("size") or 0,
            rules_of(r),
        )


def rules_of(r: asyncpg.Record) -> EndUserRules:
    return EndUserRules(r["eu_list"], r["eu_read"], r["eu_insert"], r["eu_update"], r["eu_delete"])


@dataclass(frozen=True)
class StoredFile:
    id: str
    bucket_id: str
    project_id: str
    name: str
    s3_key: str
    size: int
    content_type: str
    status: str
    created_at: datetime
    updated_at: datetime
    public_url: str | None = None


@dataclass(frozen=True)
class Limits:
    max_file_size: int
    quota_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class BucketListing:
    buckets: list[Bucket]
    total_size: int
    limits: Limits


@dataclass(frozen=True)
class FilePage:
    files: list[StoredFile]
    next_cursor: str | None


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expires_in: int
    expires_at: datetime
    public_url: str | None


@dataclass(frozen=True)
class PresignedPost:
    url: str
    fields: dict[str, str]
    expires_in: int
    expires_at: datetime
    max_size: int
    file: StoredFile


@dataclass
class ObjectStream:
    """An object's bytes as an async iterator (closed when exhausted), with its headers."""

    chunks: AsyncIterator[bytes]
    status: int
    size: int
    content_type: str
    content_range: str | None
    etag: str | None


@dataclass(frozen=True)
class BucketPatch:
    """Changes to a bucket; None leaves a field as it is (clear_mime_types clears the list)."""

    name: str | None = None
    is_public: bool | None = None
    allowed_mime_types: list[str] | None = None
    clear_mime_types: bool = False
    end_user_access: dict[str, object] | None = None  # operations to change; others keep theirs


# ---------------------------------------------------------------------------------------------
# Leases: the row an operation in flight holds


@dataclass
class Lease:
    row_id: uuid.UUID
    lease_id: uuid.UUID
    replacing: bool  # True: the row is a 'ready' file being overwritten
    s3_key: str
    committed: bool = False  # bytes are in place at s3_key; from here a failure leaves the lease to expire


_OBJECT_COLUMNS = (
    "o.id, o.bucket_id, o.project_id, o.name, o.s3_key, o.size, o.content_type, o.status, "
    "o.created_at, o.updated_at"
)


class StorageService:
    """Buckets and files of projects, on one control-plane pool and one object store."""

    def __init__(self, db: asyncpg.Pool, store: ObjectStore, settings: Settings):
        self.db = db
        self.store = store
        self.settings = settings
        self.cfg = settings.storage

    @property
    def lease_s(self) -> int:
        return max(self.cfg.orphan_grace_s, 60)

    def public_url(self, s3_key: str) -> str:
        return f"{self.settings.api_url}/api/storage/public/{quote(s3_key, safe='/')}"

    def _file(self, r: asyncpg.Record, is_public: bool = False) -> StoredFile:
        return StoredFile(
            str(r["id"]),
            str(r["bucket_id"]),
            r["project_id"],
            r["name"],
            r["s3_key"],
            r["size"],
            r["content_type"],
            r["status"],
            r["created_at"],
            r["updated_at"],
            self.public_url(r["s3_key"]) if is_public else None,
        )

    # -- limits --------------------------------------------------------------------------------

    async def limits(self, conn: asyncpg.Connection | asyncpg.Pool, project_id: str) -> Limits:
        row = await conn.fetchrow(
            """SELECT l.max_file_size, l.quota_bytes,
                      (SELECT coalesce(sum(o.size + coalesce(o.pending_size, 0)), 0)::bigint
                         FROM fluxbase.objects o WHERE o.project_id = $1) AS used
               FROM (SELECT 1) AS one LEFT JOIN fluxbase.storage_limits l ON l.project_id = $1""",
            project_id,
        )
        assert row is not None
        return Limits(
            row["max_file_size"] or self.cfg.max_file_size,
            row["quota_bytes"] or self.cfg.quota_bytes,
            row["used"],
        )

    # -- buckets -------------------------------------------------------------------------------

    async def resolve_bucket(
        self, conn: asyncpg.Connection | asyncpg.Pool, project_id: str, ref: object, *, lock: bool = False
    ) -> Bucket:
        """A bucket of the project by UUID or name; NOT_FOUND otherwise (also for other projects' ids)."""
        if not isinstance(ref, str) or not ref:
            raise ValidationError("bucketId is required (the bucket's UUID or name).")
        as_id = as_uuid(ref)
        column = "id" if as_id is not None else "name"
        row = await conn.fetchrow(
            f"SELECT * FROM fluxbase.buckets WHERE project_id = $1 AND {column} = $2"
            + (" FOR UPDATE" if lock else ""),
            project_id,
            uuid.UUID(as_id) if as_id is not None else ref,
        )
        if row is None:
            raise NotFound(f"No bucket {ref!r} in this project.")
        return Bucket.from_row(row)

    async def list_buckets(self, sa: StorageAccess) -> BucketListing:
        """The project's buckets; an end user sees those open to end users (or public), with
        counts of the files their list rule shows them."""
        visible = "true" if sa.end_user is None else end_user_sql("b.eu_list", "$2")
        rows = await self.db.fetch(
            f"""SELECT b.*, count(o.id) FILTER (WHERE o.status = 'ready' AND {visible}) AS file_count,
                      coalesce(sum(o.size) FILTER (WHERE o.status = 'ready' AND {visible}), 0)::bigint AS size
               FROM fluxbase.buckets b LEFT JOIN fluxbase.objects o ON o.bucket_id = b.id
               WHERE b.project_id = $1 AND ($2::text IS NULL OR b.is_public
                     OR 'none' <> ANY (ARRAY[b.eu_list, b.eu_read, b.eu_insert, b.eu_update, b.eu_delete]))
               GROUP BY b.id ORDER BY b.name""",
            sa.project_id,
            sa.end_user,
        )
        buckets = [Bucket.from_row(r) for r in rows]
        limits = await self.limits(self.db, sa.project_id)
        return BucketListing(buckets, sum(b.size for b in buckets), limits)

    async def create_bucket(
        self,
        access: ProjectAccess,
        name: object,
        is_public: bool,
        allowed_mime_types: list[str] | None = None,
        end_user_access: object = None,
    ) -> Bucket:
        name = check_bucket_name(name)
        types = check_mime_patterns(allowed_mime_types)
        rules = EndUserRules() if end_user_access is None else check_end_user_rules(end_user_access)
        try:
            row = await self.db.fetchrow(
                """INSERT INTO fluxbase.buckets (project_id, name, is_public, allowed_mime_types,
                       eu_list, eu_read, eu_insert, eu_update, eu_delete)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *""",
                access.project.id,
                name,
                bool(is_public),
                types,
                *rules.out().values(),
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"A bucket named {name!r} already exists in this project.") from None
        assert row is not None
        return Bucket.from_row(row)

    async def update_bucket(self, access: ProjectAccess, ref: object, patch: BucketPatch) -> Bucket:
        """Rename or change a bucket; keys use the bucket's UUID, so a rename moves no bytes."""
        new_name = check_bucket_name(patch.name) if patch.name is not None else None
        types = None if patch.allowed_mime_types is None else check_mime_patterns(patch.allowed_mime_types)
        async with self.db.acquire() as conn, conn.transaction():
            bucket = await self.resolve_bucket(conn, access.project.id, ref, lock=True)
            rules = bucket.rules
            if patch.end_user_access is not None:
                rules = check_end_user_rules(patch.end_user_access, bucket.rules)
            try:
                row = await conn.fetchrow(
                    """UPDATE fluxbase.buckets
                       SET name = coalesce($2, name), is_public = coalesce($3, is_public),
                           allowed_mime_types = CASE WHEN $5 THEN NULL
                                                     ELSE coalesce($4, allowed_mime_types) END,
                           eu_list = $6, eu_read = $7, eu_insert = $8, eu_update = $9, eu_delete = $10,
                           updated_at = now()
                       WHERE id = $1 RETURNING *""",
                    uuid.UUID(bucket.id),
                    new_name,
                    patch.is_public,
                    types,
                    patch.clear_mime_types,
                    *rules.out().values(),
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(f"A bucket named {new_name!r} already exists in this project.") from None
        assert row is not None
        return Bucket.from_row(row)

    async def delete_bucket(self, access: ProjectAccess, ref: object) -> Bucket:
        """Delete an empty bucket; CONFLICT (409) while it holds files or uploads in flight."""
        async with self.db.acquire() as conn, conn.transaction():
            bucket = await self.resolve_bucket(conn, access.project.id, ref, lock=True)
            busy = await conn.fetchval(
                """SELECT count(*) FROM fluxbase.objects
                   WHERE bucket_id = $1 AND (status <> 'pending' OR lease_until > now())""",
                uuid.UUID(bucket.id),
            )
            if busy:
                raise Conflict(
                    f"Bucket {bucket.name!r} is not empty: it holds {busy} file(s). Delete them first."
                )
            # Abandoned uploads' rows go with it; their bytes, if any, are orphans for housekeeping.
            await conn.execute("DELETE FROM fluxbase.buckets WHERE id = $1", uuid.UUID(bucket.id))
        return bucket

    # -- listing, signing, reading -------------------------------------------------------------

    async def list_files(
        self,
        sa: StorageAccess,
        bucket_ref: object,
        *,
        prefix: str = "",
        limit: int = DEFAULT_LIST_LIMIT,
        cursor: str | None = None,
    ) -> FilePage:
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValidationError(f"limit must be between 1 and {MAX_LIST_LIMIT}.")
        if len(prefix.encode()) > MAX_NAME_BYTES or any(unicodedata.category(c) == "Cc" for c in prefix):
            raise ValidationError("prefix is not valid.")
        after = decode_cursor(cursor) if cursor else None
        bucket = await self.resolve_bucket(self.db, sa.project_id, bucket_ref)
        if sa.end_user is not None and bucket.rules.list == "none":
            raise InsufficientPermissions(f"End users may not list bucket {bucket.name!r}.")
        rows = await self.db.fetch(
            f"""SELECT {_OBJECT_COLUMNS} FROM fluxbase.objects o
               WHERE o.bucket_id = $1 AND o.status = 'ready' AND o.name >= $2 AND starts_with(o.name, $2)
                 AND ($3::text IS NULL OR o.name > $3)
                 AND ($5::text IS NULL OR {end_user_sql("$6::text", "$5::text")})
               ORDER BY o.name LIMIT $4""",
            uuid.UUID(bucket.id),
            prefix,
            after,
            limit + 1,
            sa.end_user,
            bucket.rules.list,
        )
        files = [self._file(r, bucket.is_public) for r in rows[:limit]]
        next_cursor = encode_cursor(files[-1].name) if len(rows) > limit else None
        return FilePage(files, next_cursor)

    async def _ready_file(self, sa: StorageAccess, s3_key: str) -> StoredFile:
        """A ready file of the project that the caller may read; NOT_FOUND otherwise (an end user
        learns nothing of files their read rule hides)."""
        row = await self.db.fetchrow(
            f"""SELECT {_OBJECT_COLUMNS}, o.owner_uid, b.is_public, b.eu_read FROM fluxbase.objects o
                JOIN fluxbase.buckets b ON b.id = o.bucket_id
                WHERE o.project_id = $1 AND o.s3_key = $2 AND o.status = 'ready'""",
            sa.project_id,
            s3_key,
        )
        if row is None:
            raise NotFound("No such file.")
        if sa.end_user is not None and not (
            row["is_public"] or end_user_allows(row["eu_read"], sa.end_user, row["name"], row["owner_uid"])
        ):
            raise NotFound("No such file.")
        return self._file(row, row["is_public"])

    async def sign_download(self, sa: StorageAccess, s3_key: object, expires_in: int | None) -> SignedUrl:
        """A presigned GET URL for a file of the project (15 minutes unless expiresIn says otherwise)."""
        key = parse_object_key(sa.project_id, s3_key)
        ttl = self.cfg.url_expires_default_s if expires_in is None else expires_in
        if not 1 <= ttl <= self.cfg.url_expires_max_s:
            raise ValidationError(f"expiresIn must be between 1 and {self.cfg.url_expires_max_s} seconds.")
        file = await self._ready_file(sa, key)
        with s3_errors():
            url = await self.store.presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.store.bucket, "Key": file.s3_key}, ExpiresIn=ttl
            )
        return SignedUrl(url, ttl, datetime.now(UTC) + timedelta(seconds=ttl), file.public_url)

    async def open_public(self, s3_key: str, range_header: str | None) -> ObjectStream:
        """Stream a file of a public bucket (no key needed); NOT_FOUND for private or missing files alike."""
        owner = s3_key.partition("/")[0]
        if not ids.valid_project_id(owner):
            raise NotFound("No such public file.")
        try:
            key = parse_object_key(owner, s3_key)
        except ValidationError:
            raise NotFound("No such public file.") from None
        row = await self.db.fetchrow(
            """SELECT o.content_type FROM fluxbase.objects o JOIN fluxbase.buckets b ON b.id = o.bucket_id
               JOIN fluxbase.projects p ON p.id = o.project_id
               WHERE o.s3_key = $1 AND o.status = 'ready' AND b.is_public AND p.status = 'active'""",
            key,
        )
        if row is None:
            raise NotFound("No such public file.")
        params: dict[str, Any] = {"Bucket": self.store.bucket, "Key": key}
        if range_header and _RANGE.fullmatch(range_header.strip()) and range_header.strip() != "bytes=-":
            params["Range"] = range_header.strip()
        try:
            with s3_errors():
                resp = await self.store.client.get_object(**params)
        except ObjectMissing:
            raise NotFound("No such public file.") from None
        except StorageUnavailable as exc:
            cause = exc.__cause__
            if getattr(cause, "response", {}).get("Error", {}).get("Code") == "InvalidRange":
                raise RangeNotSatisfiable() from None
            raise

        body = resp["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            async with body:
                with s3_errors():
                    async for chunk in body.iter_chunks(256 * 1024):
                        yield chunk

        return ObjectStream(
            chunks(),
            206 if resp.get("ContentRange") else 200,
            resp["ContentLength"],
            resp.get("ContentType") or row["content_type"],
            resp.get("ContentRange"),
            resp.get("ETag"),
        )

    # -- deleting ------------------------------------------------------------------------------

    async def delete_files(
        self, sa: StorageAccess, s3_keys: list[object], *, single: bool = False
    ) -> tuple[list[str], list[str]]:
        """Delete files (S3 and row); returns (deleted keys, keys not found). One key that is not
        there is NOT_FOUND; in a list, missing keys are reported instead."""
        if not s3_keys:
            raise ValidationError("s3Key is required.")
        if len(s3_keys) > MAX_BULK_DELETE:
            raise ValidationError(f"At most {MAX_BULK_DELETE} files per request.")
        keys = [parse_object_key(sa.project_id, k) for k in s3_keys]
        deleted, missing = [], []
        for key in dict.fromkeys(keys):
            try:
                await self._delete_one(sa.project_id, key, sa.end_user)
                deleted.append(key)
            except NotFound:
                if single:
                    raise
                missing.append(key)
        return deleted, missing

    async def _delete_one(self, project_id: str, key: str, end_user: str | None = None) -> None:
        """Delete one file; an end user only one their bucket's delete rule allows (else NOT_FOUND)."""
        lease_id = uuid.uuid4()
        # The rule is evaluated in the same statement that leases the row, so it holds for the
        # row as it is deleted.
        allowed = f"($5::text IS NULL OR {end_user_sql('b.eu_delete', '$5')})"
        row = await self.db.fetchrow(
            f"""UPDATE fluxbase.objects o SET status = 'deleting', lease_id = $3, lease_kind = 'delete',
                   lease_until = now() + make_interval(secs => $4), updated_at = now()
               FROM fluxbase.buckets b
               WHERE b.id = o.bucket_id AND o.project_id = $1 AND o.s3_key = $2 AND o.status = 'ready'
                 AND (o.lease_id IS NULL OR o.lease_until < now()) AND {allowed}
               RETURNING o.id""",
            project_id,
            key,
            lease_id,
            self.lease_s,
            end_user,
        )
        if row is None:
            busy = await self.db.fetchval(
                f"""SELECT o.status FROM fluxbase.objects o JOIN fluxbase.buckets b ON b.id = o.bucket_id
                    WHERE o.project_id = $1 AND o.s3_key = $2 AND {allowed.replace("$5", "$3")}""",
                project_id,
                key,
                end_user,
            )
            if busy in ("ready", "deleting"):
                raise Conflict("This file is being uploaded or deleted right now; retry in a moment.")
            raise NotFound("No such file.")
        try:
            with s3_errors():
                await self.store.client.delete_object(Bucket=self.store.bucket, Key=key)
        except (StorageUnavailable, ObjectMissing) as exc:
            if isinstance(exc, StorageUnavailable):
                # Nothing happened: give the file back rather than leave it half-deleted.
                await self.db.execute(
                    """UPDATE fluxbase.objects SET status = 'ready', lease_id = NULL, lease_kind = NULL,
                           lease_until = NULL WHERE id = $1 AND lease_id = $2""",
                    row["id"],
                    lease_id,
                )
                raise
        await self.db.execute(
            "DELETE FROM fluxbase.objects WHERE id = $1 AND lease_id = $2", row["id"], lease_id
        )

    # -- uploads: shared steps -----------------------------------------------------------------

    def check_insert(self, bucket: Bucket, name: str, end_user: str | None) -> None:
        """An end user may create `name` in `bucket` only if the bucket's insert rule allows it."""
        if end_user is not None and not end_user_allows(bucket.rules.insert, end_user, name, end_user):
            raise InsufficientPermissions(f"End users may not upload {name!r} to bucket {bucket.name!r}.")

    async def acquire(
        self,
        bucket: Bucket,
        name: str,
        *,
        upsert: bool,
        kind: str,
        upload_expires_at: datetime | None = None,
        end_user: str | None = None,
    ) -> Lease:
        """Insert a pending row (or lease the ready row to replace); CONFLICT if the name is taken or busy.

        For an end user, a new file needs the bucket's insert rule and becomes theirs; replacing
        one needs the update rule, evaluated on the locked row.
        """
        key = object_key(bucket.project_id, bucket.id, name)
        lease_id = uuid.uuid4()
        until = (upload_expires_at or datetime.now(UTC)) + timedelta(seconds=self.lease_s)
        async with self.db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT id, status, owner_uid, lease_id IS NOT NULL AND lease_until > now() AS busy
                   FROM fluxbase.objects WHERE bucket_id = $1 AND name = $2 FOR UPDATE""",
                uuid.UUID(bucket.id),
                name,
            )
            if row is not None and row["busy"]:
                raise Conflict(f"{name!r} is being uploaded or deleted right now; retry in a moment.")
            if row is not None and row["status"] == "ready":
                if not upsert:
                    raise Conflict(
                        f"A file named {name!r} already exists in bucket {bucket.name!r}. "
                        "Send upsert=true to replace it."
                    )
                if end_user is not None and not end_user_allows(
                    bucket.rules.update, end_user, name, row["owner_uid"]
                ):
                    raise InsufficientPermissions(
                        f"End users may not replace {name!r} in bucket {bucket.name!r}."
                    )
                await conn.execute(
                    """UPDATE fluxbase.objects SET lease_id = $2, lease_kind = $3, lease_until = $4,
                           upload_expires_at = $5 WHERE id = $1""",
                    row["id"],
                    lease_id,
                    kind,
                    until,
                    upload_expires_at,
                )
                return Lease(row["id"], lease_id, True, key)
            self.check_insert(bucket, name, end_user)
            if row is not None:  # an abandoned upload or delete: take the row over
                await conn.execute(
                    """UPDATE fluxbase.objects SET status = 'pending', size = 0, pending_size = NULL,
                           lease_id = $2, lease_kind = $3, lease_until = $4, upload_expires_at = $5,
                           owner_uid = $6, created_at = now(), updated_at = now() WHERE id = $1""",
                    row["id"],
                    lease_id,
                    kind,
                    until,
                    upload_expires_at,
                    end_user,
                )
                return Lease(row["id"], lease_id, False, key)
            try:
                row_id = await conn.fetchval(
                    """INSERT INTO fluxbase.objects (bucket_id, project_id, name, s3_key, status, lease_id,
                           lease_kind, lease_until, upload_expires_at, owner_uid)
                       VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8, $9) RETURNING id""",
                    uuid.UUID(bucket.id),
                    bucket.project_id,
                    name,
                    key,
                    lease_id,
                    kind,
                    until,
                    upload_expires_at,
                    end_user,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"Bucket {bucket.name!r} was deleted.") from None
            except asyncpg.UniqueViolationError:
                raise Conflict(f"{name!r} is being uploaded right now; retry in a moment.") from None
            return Lease(row_id, lease_id, False, key)

    async def release(self, lease: Lease) -> None:
        """Undo an upload that never committed: drop the pending row or unlock the replaced one."""
        if lease.replacing:
            await self.db.execute(
                """UPDATE fluxbase.objects SET lease_id = NULL, lease_kind = NULL, lease_until = NULL,
                       pending_size = NULL, upload_expires_at = NULL WHERE id = $1 AND lease_id = $2""",
                lease.row_id,
                lease.lease_id,
            )
        else:
            await self.db.execute(
                "DELETE FROM fluxbase.objects WHERE id = $1 AND lease_id = $2", lease.row_id, lease.lease_id
            )

    async def reserve(self, project_id: str, lease: Lease, size: int) -> None:
        """Check the file size and quota under the project's lock and reserve the bytes.

        The lock is the project's control-plane row (FOR NO KEY UPDATE: it serialises reservations
        but not the foreign-key checks of inserts). It used to be an advisory lock, and any tenant
        may take any advisory-lock key: one project could then stall another's uploads.
        """
        async with self.db.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT true FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE", project_id
            )
            if not found:
                raise NotFound("The project was deleted.")
            limits = await self.limits(conn, project_id)
            if size > limits.max_file_size:
                raise PayloadTooLarge(
                    f"The file is {size_text(size)}; this project's maximum file size is "
                    f"{size_text(limits.max_file_size)}."
                )
            own = await conn.fetchval(
                "SELECT size + coalesce(pending_size, 0) FROM fluxbase.objects WHERE id = $1", lease.row_id
            )
            others = limits.used_bytes - (own or 0)
            if others + size > limits.quota_bytes:
                raise QuotaExceeded(
                    f"Storage quota exceeded: the project stores {size_text(others)} of "
                    f"{size_text(limits.quota_bytes)} and this file needs {size_text(size)}."
                )
            done = await conn.execute(
                "UPDATE fluxbase.objects SET pending_size = $3 WHERE id = $1 AND lease_id = $2",
                lease.row_id,
                lease.lease_id,
                size,
            )
            if done != "UPDATE 1":
                raise Conflict("The upload took too long and was abandoned; retry it.")

    async def finalize(self, lease: Lease, size: int, content_type: str, is_public: bool) -> StoredFile:
        row = await self.db.fetchrow(
            f"""UPDATE fluxbase.objects o
               SET status = 'ready', size = $3, content_type = $4, pending_size = NULL, lease_id = NULL,
                   lease_kind = NULL, lease_until = NULL, upload_expires_at = NULL, updated_at = now()
               WHERE o.id = $1 AND o.lease_id = $2 AND o.status <> 'deleting' RETURNING {_OBJECT_COLUMNS}""",
            lease.row_id,
            lease.lease_id,
            size,
            content_type,
        )
        if row is None:
            raise Conflict("The upload took too long and was abandoned; retry it.")
        return self._file(row, is_public)

    async def heartbeat(self, lease: Lease) -> None:
        await self.db.execute(
            "UPDATE fluxbase.objects SET lease_until = now() + make_interval(secs => $3) "
            "WHERE id = $1 AND lease_id = $2",
            lease.row_id,
            lease.lease_id,
            self.lease_s,
        )

    def upload_cap(self, limits: Limits, replaced_size: int = 0) -> tuple[int, FluxbaseError]:
        """How many bytes an upload may stream, and the error once it streams more."""
        room = limits.quota_bytes - limits.used_bytes + replaced_size
        if room < limits.max_file_size:
            return max(room, 0), QuotaExceeded(
                f"Storage quota exceeded: the project stores {size_text(limits.used_bytes)} of "
                f"{size_text(limits.quota_bytes)}; this upload may add at most {size_text(max(room, 0))}."
            )
        return limits.max_file_size, PayloadTooLarge(
            f"The file exceeds this project's maximum file size of {size_text(limits.max_file_size)}."
        )

    async def session_cap(self, user_id: str) -> tuple[int, FluxbaseError]:
        """Before projectId is known: the largest file any project the user may upload to accepts."""
        cap = await self.db.fetchval(
            """SELECT max(coalesce(l.max_file_size, $2)) FROM fluxbase.project_members m
               LEFT JOIN fluxbase.storage_limits l ON l.project_id = m.project_id
               WHERE m.user_id = $1 AND m.role IN ('admin', 'developer')""",
            user_id,
            self.cfg.max_file_size,
        )
        if cap is None:
            raise InsufficientPermissions(
                "You are not a developer or admin of any project, so you may not upload."
            )
        return cap, PayloadTooLarge(f"The file exceeds the maximum file size of {size_text(cap)}.")

    async def delete_staging(self, key: str) -> None:
        with contextlib.suppress(Exception):  # housekeeping removes staging leftovers
            await self.store.client.delete_object(Bucket=self.store.bucket, Key=key)

    # -- uploads: presigned POST ---------------------------------------------------------------

    async def create_upload_url(
        self,
        sa: StorageAccess,
        bucket_ref: object,
        name: object,
        *,
        content_type: str | None,
        size: int | None,
        expires_in: int | None,
        upsert: bool,
    ) -> PresignedPost:
        """A presigned POST form limited by content-length-range and Content-Type, for a staging
        key of its own; `confirm_upload` (or housekeeping, if the client never confirms) copies
        the bytes to the file. A declared `size` is the only size the form accepts."""
        bucket = await self.resolve_bucket(self.db, sa.project_id, bucket_ref)
        name = check_object_name(name)
        ctype = check_content_type(content_type)
        if not mime_allowed(bucket.allowed_mime_types, ctype):
            raise UnsupportedMediaType(f"Bucket {bucket.name!r} does not accept {ctype!r}.")
        ttl = min(self.cfg.upload_url_expires_max_s, 600) if expires_in is None else expires_in
        if not 1 <= ttl <= self.cfg.upload_url_expires_max_s:
            raise ValidationError(
                f"expiresIn must be between 1 and {self.cfg.upload_url_expires_max_s} seconds."
            )
        if size is not None and size < 0:
            raise ValidationError("size must not be negative.")
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        lease = await self.acquire(
            bucket, name, upsert=upsert, kind="presigned", upload_expires_at=expires_at, end_user=sa.end_user
        )
        try:
            limits = await self.limits(self.db, sa.project_id)
            replaced = await self.db.fetchval("SELECT size FROM fluxbase.objects WHERE id = $1", lease.row_id)
            cap, error = self.upload_cap(limits, replaced or 0)
            if size is not None and size > cap:
                raise error
            if size is not None:
                await self.reserve(sa.project_id, lease, size)
            with s3_errors():
                post = await self.store.presigner.generate_presigned_post(
                    self.store.bucket,
                    presigned_key(sa.project_id, lease.lease_id),
                    Fields={"Content-Type": ctype},
                    Conditions=[
                        ["content-length-range", size or 0, size if size is not None else cap],
                        {"Content-Type": ctype},
                    ],
                    ExpiresIn=ttl,
                )
        except BaseException:
            await asyncio.shield(self.release(lease))
            raise
        row = await self.db.fetchrow(
            f"SELECT {_OBJECT_COLUMNS} FROM fluxbase.objects o WHERE o.id = $1", lease.row_id
        )
        assert row is not None
        return PresignedPost(
            post["url"],
            dict(post["fields"]),
            ttl,
            expires_at,
            size if size is not None else cap,
            self._file(row, bucket.is_public),
        )

    async def confirm_upload(self, sa: StorageAccess, file_id: object) -> StoredFile:
        """Register a presigned POST upload once its bytes are in S3 (idempotent)."""
        row_id = as_uuid(file_id)
        if row_id is None:
            raise ValidationError("fileId must be the id returned by upload-url.")
        row = await self.db.fetchrow(
            f"""SELECT {_OBJECT_COLUMNS}, o.lease_id, o.lease_kind, o.owner_uid, b.is_public, b.eu_update
                FROM fluxbase.objects o JOIN fluxbase.buckets b ON b.id = o.bucket_id
                WHERE o.id = $1 AND o.project_id = $2""",
            uuid.UUID(row_id),
            sa.project_id,
        )
        if row is None:
            raise NotFound("No such upload.")
        replacing = row["status"] == "ready"
        if sa.end_user is not None:
            # Only what this end user could have started: a new file is theirs (acquire set
            # owner_uid), a replacement needs the bucket's update rule.
            if replacing:
                ok = end_user_allows(row["eu_update"], sa.end_user, row["name"], row["owner_uid"])
            else:
                ok = row["owner_uid"] == sa.end_user
            if not ok:
                raise NotFound("No such upload.")
        if row["lease_kind"] != "presigned":
            if replacing:
                return self._file(row, row["is_public"])
            raise NotFound("No such upload.")
        lease = Lease(row["id"], row["lease_id"], replacing, row["s3_key"])
        result = await self._register_presigned(lease, sa.project_id, row["is_public"])
        if result is None:
            raise Conflict("The file has not been uploaded yet: POST it to the presigned URL first.")
        return result

    async def _register_presigned(self, lease: Lease, project_id: str, is_public: bool) -> StoredFile | None:
        """Copy a presigned POST's bytes from its staging key to the file and register them.

        The copy is of the exact version measured (CopySourceIfMatch), so what the row and the
        quota account for is what the file holds, even if the form is used again meanwhile.
        """
        staged = presigned_key(project_id, lease.lease_id)
        try:
            with s3_errors():
                head = await self.store.client.head_object(Bucket=self.store.bucket, Key=staged)
        except ObjectMissing:
            return None
        size, ctype = int(head["ContentLength"]), head.get("ContentType") or DEFAULT_CONTENT_TYPE
        try:
            await self.reserve(project_id, lease, size)
        except (PayloadTooLarge, QuotaExceeded):
            await self.delete_staging(staged)
            await self.release(lease)
            raise
        await copy_object(self.store, staged, lease.s3_key, size, ctype, if_match=head.get("ETag"))
        lease.committed = True
        file = await self.finalize(lease, size, ctype, is_public)
        await self.delete_staging(staged)
        return file

    # -- housekeeping --------------------------------------------------------------------------

    async def housekeep(self) -> dict[str, int]:
        """Finish or undo operations whose lease ran out, register confirmed-by-S3 presigned uploads,
        abort stale multipart uploads, and delete objects that have no row (orphans)."""
        stats = {"registered": 0, "undone": 0, "repaired": 0, "orphans": 0, "aborted": 0}
        await self._settle_presigned(stats)
        await self._settle_expired_leases(stats)
        await self._abort_stale_multipart(stats)
        await self._delete_orphans(stats)
        return stats

    async def _settle_presigned(self, stats: dict[str, int]) -> None:
        rows = await self.db.fetch(
            """SELECT o.id, o.lease_id, o.status, o.s3_key, o.project_id, b.is_public FROM fluxbase.objects o
               JOIN fluxbase.buckets b ON b.id = o.bucket_id
               WHERE o.lease_kind = 'presigned' AND o.upload_expires_at < now() LIMIT 500"""
        )
        for r in rows:
            lease = Lease(r["id"], r["lease_id"], r["status"] == "ready", r["s3_key"])
            try:
                if await self._register_presigned(lease, r["project_id"], r["is_public"]) is not None:
                    stats["registered"] += 1
            except (PayloadTooLarge, QuotaExceeded, Conflict):
                stats["undone"] += 1

    async def _settle_expired_leases(self, stats: dict[str, int]) -> None:
        rows = await self.db.fetch(
            """SELECT id, lease_id, status, s3_key FROM fluxbase.objects
               WHERE lease_id IS NOT NULL AND lease_until < now() LIMIT 500"""
        )
        for r in rows:
            # Take the lease over first, so a late owner cannot finalize what we are undoing.
            mine = uuid.uuid4()
            taken = await self.db.fetchval(
                """UPDATE fluxbase.objects SET lease_id = $3, lease_until = now() + make_interval(secs => $4)
                   WHERE id = $1 AND lease_id = $2 RETURNING id""",
                r["id"],
                r["lease_id"],
                mine,
                self.lease_s,
            )
            if taken is None:
                continue
            if r["status"] == "ready":
                # A replacement died: the object is whole (old or new bytes); make the row match it.
                try:
                    with s3_errors():
                        head = await self.store.client.head_object(Bucket=self.store.bucket, Key=r["s3_key"])
                except ObjectMissing:
                    await self.db.execute(
                        "DELETE FROM fluxbase.objects WHERE id = $1 AND lease_id = $2", r["id"], mine
                    )
                    stats["undone"] += 1
                    continue
                await self.db.execute(
                    """UPDATE fluxbase.objects SET size = $3, content_type = $4, pending_size = NULL,
                           lease_id = NULL, lease_kind = NULL, lease_until = NULL, upload_expires_at = NULL,
                           updated_at = now() WHERE id = $1 AND lease_id = $2""",
                    r["id"],
                    mine,
                    int(head["ContentLength"]),
                    head.get("ContentType") or DEFAULT_CONTENT_TYPE,
                )
                stats["repaired"] += 1
                continue
            # A pending upload or a delete that never finished: remove the bytes, then the row.
            with s3_errors():
                await self.store.client.delete_object(Bucket=self.store.bucket, Key=r["s3_key"])
            await self.db.execute(
                "DELETE FROM fluxbase.objects WHERE id = $1 AND lease_id = $2", r["id"], mine
            )
            stats["undone"] += 1

    async def _abort_stale_multipart(self, stats: dict[str, int]) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=self.cfg.max_upload_s)
        with s3_errors():
            paginator = self.store.client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.store.bucket):
                for up in page.get("Uploads", []):
                    if up["Initiated"] < cutoff:
                        with contextlib.suppress(ObjectMissing):
                            with s3_errors():
                                await self.store.client.abort_multipart_upload(
                                    Bucket=self.store.bucket, Key=up["Key"], UploadId=up["UploadId"]
                                )
                        stats["aborted"] += 1

    async def _delete_orphans(self, stats: dict[str, int]) -> None:
        """Objects older than the grace period with no row (any status) are garbage; keys outside
        the platform's layout are left alone."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.cfg.orphan_grace_s)
        with s3_errors():
            paginator = self.store.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.store.bucket):
                old = [o["Key"] for o in page.get("Contents", []) if o["LastModified"] <= cutoff]
                staging = [k for k in old if k.startswith(STAGING_PREFIX)]
                staging += await self._dead_presigned([k for k in old if k.startswith(PRESIGNED_PREFIX)])
                project_keys = [k for k in old if ids.valid_project_id(k.partition("/")[0])]
                known = (
                    {
                        r["s3_key"]
                        for r in await self.db.fetch(
                            "SELECT s3_key FROM fluxbase.objects WHERE s3_key = ANY($1::text[])", project_keys
                        )
                    }
                    if project_keys
                    else set()
                )
                doomed = staging + [k for k in project_keys if k not in known]
                stats["orphans"] += await self._delete_keys(doomed)

    async def _dead_presigned(self, keys: list[str]) -> list[str]:
        """Presigned staging objects whose form no longer belongs to a live presigned lease."""
        leases = {k: as_uuid(k.rpartition("/")[2]) for k in keys}
        live = {
            str(r["lease_id"])
            for r in await self.db.fetch(
                """SELECT lease_id FROM fluxbase.objects
                   WHERE lease_kind = 'presigned' AND lease_id = ANY($1::uuid[])""",
                [uuid.UUID(v) for v in leases.values() if v is not None],
            )
        }
        return [k for k, lease in leases.items() if lease not in live]

    async def _delete_keys(self, keys: list[str]) -> int:
        deleted = 0
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with s3_errors():
                resp = await self.store.client.delete_objects(
                    Bucket=self.store.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            deleted += len(batch) - len(resp.get("Errors", []))
        return deleted


async def delete_project_objects(store: ObjectStore, project_id: str) -> int:
    """Remove every object and unfinished multipart upload under `<projectId>/`; returns objects deleted.

    Call after the project's rows are gone; if S3 is down this raises StorageUnavailable and the
    objects, now without rows, are removed later by housekeeping.
    """
    if not ids.valid_project_id(project_id):
        raise ValueError("not a project id")
    deleted = 0
    for prefix in (f"{project_id}/", f"{PRESIGNED_PREFIX}{project_id}/"):
        deleted += await _delete_prefix(store, prefix)
    return deleted


async def _delete_prefix(store: ObjectStore, prefix: str) -> int:
    deleted = 0
    with s3_errors():
        uploads = store.client.get_paginator("list_multipart_uploads")
        async for page in uploads.paginate(Bucket=store.bucket, Prefix=prefix):
            for up in page.get("Uploads", []):
                with contextlib.suppress(Exception):
                    await store.client.abort_multipart_upload(
                        Bucket=store.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
        objects = store.client.get_paginator("list_objects_v2")
        async for page in objects.paginate(Bucket=store.bucket, Prefix=prefix):
            keys = [o["Key"] for o in page.get("Contents", [])]
            if keys:
                resp = await store.client.delete_objects(
                    Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                )
                deleted += len(keys) - len(resp.get("Errors", []))
    return deleted
