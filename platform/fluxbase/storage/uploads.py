"""Streamed multipart/form-data uploads: the state machine between request chunks and S3.

When `projectId`, `bucketId` (and `name`, if sent) arrive before the file part, or in the
query string, the file streams straight to its final key under a lease on its row. The
reference doc's curl example sends the file first, so the bucket is not yet known: the bytes
then stream to `_staging/<uuid>` and, once the form is read and authorised, are copied
server-side to the final key and the staging object is deleted. Either way the byte cap
(file size limit, remaining quota) is enforced as the bytes arrive, and any failure aborts the
S3 upload and removes the pending row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fluxbase.errors import FluxbaseError, UnsupportedMediaType, ValidationError
from fluxbase.services.access import Principal, Project
from fluxbase.services.identity import IdentityResolver
from fluxbase.storage.access import Op, StorageAccess, storage_access
from fluxbase.storage.rules import (
    DEFAULT_CONTENT_TYPE,
    check_content_type,
    check_object_name,
    mime_allowed,
    parse_bool,
)
from fluxbase.storage.service import STAGING_PREFIX, Bucket, Lease, StorageService, StoredFile
from fluxbase.storage.streaming import (
    MAX_FIELD_BYTES,
    MAX_HEADER_BYTES,
    MAX_PARTS,
    FileTooLarge,
    FormReader,
    PartInfo,
    S3Writer,
    boundary_of,
    copy_object,
)

log = logging.getLogger("fluxbase.storage")

# Upper bound of a form's bytes besides the file: a body bigger than cap + this cannot fit.
FORM_ENVELOPE = MAX_PARTS * (MAX_FIELD_BYTES + MAX_HEADER_BYTES + 256)


async def stream_upload(
    svc: StorageService, identity: IdentityResolver, req: UploadRequest, chunks: AsyncIterator[bytes]
) -> StoredFile:
    """Stream a multipart/form-data upload to S3 and register the file."""
    upload = _StreamedUpload(svc, identity, req, FormReader(boundary_of(req.content_type)))
    try:
        return await upload.run(chunks)
    except FluxbaseError:
        await _drain(chunks, req.content_length)
        raise
    finally:
        await asyncio.shield(upload.cleanup())


@dataclass(frozen=True)
class UploadRequest:
    """What the HTTP layer hands over for a streamed upload (no Litestar types)."""

    principal: Principal
    key_project: Project | None
    content_type: str | None
    content_length: int | None
    query: dict[str, str]
    upsert_header: str | None = None
    user_token: str | None = None  # X-Fluxbase-User-Token: the upload is that end user's


DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_SECONDS = 5.0


async def _drain(chunks: AsyncIterator[bytes], content_length: int | None) -> None:
    """Read (and drop) a small unread rest of a refused upload, so the client sees our error
    response instead of a connection reset; a big rest is not worth reading."""
    if content_length is not None and content_length > DRAIN_LIMIT:
        return
    read = 0

    async def consume() -> None:
        nonlocal read
        async for chunk in chunks:
            read += len(chunk)
            if read > DRAIN_LIMIT:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), DRAIN_SECONDS)


_DESTINATION_FIELDS = ("projectId", "bucketId", "name", "upsert")


@dataclass
class _StreamedUpload:
    svc: StorageService
    identity: IdentityResolver
    req: UploadRequest
    reader: FormReader
    fields: dict[str, str] = field(default_factory=dict)
    file_part: PartInfo | None = None
    writer: S3Writer | None = None
    lease: Lease | None = None
    access: StorageAccess | None = None
    bucket: Bucket | None = None
    name: str | None = None
    content_type: str = DEFAULT_CONTENT_TYPE
    cap_error: FluxbaseError | None = None
    staged_key: str | None = None  # set while the bytes go to _staging/
    staged_committed: bool = False
    used_values: dict[str, str | None] = field(default_factory=dict)
    last_beat: float = 0.0

    def value(self, name: str) -> str | None:
        form, query = self.fields.get(name), self.req.query.get(name)
        if form is not None and query is not None and form != query:
            raise ValidationError(f"{name} differs between the query string and the form.")
        return form if form is not None else query

    def upsert(self) -> bool:
        v = self.value("upsert")
        return parse_bool(v if v is not None else self.req.upsert_header, "upsert")

    async def run(self, chunks: AsyncIterator[bytes]) -> StoredFile:
        current: str | None = None
        buf = bytearray()
        async for event in self.reader.events(chunks):
            if event.kind == "begin":
                assert event.part is not None
                part = event.part
                if part.filename is not None or part.name == "file":
                    if part.name != "file":
                        raise ValidationError("Send the file in the form field named 'file'.")
                    if self.file_part is not None:
                        raise ValidationError("Send exactly one file per upload.")
                    self.file_part = part
                    await self.begin_file(part)
                    current = "file"
                else:
                    current, buf = part.name, bytearray()
            elif event.kind == "data":
                if current == "file":
                    await self.write(event.data)
                else:
                    buf += event.data
                    if len(buf) > MAX_FIELD_BYTES:
                        raise ValidationError(f"Form field {current!r} is over {MAX_FIELD_BYTES} bytes.")
            else:
                if current is not None and current != "file":
                    if current in self.fields:
                        raise ValidationError(f"Form field {current!r} was sent twice.")
                    try:
                        self.fields[current] = buf.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ValidationError(f"Form field {current!r} is not UTF-8.") from None
                current = None
        if self.file_part is None or self.writer is None:
            raise ValidationError("The form has no 'file' part. Required fields: file, bucketId, projectId.")
        return await self.complete()

    # The destination is fixed when the file part begins if everything is known by then.
    async def begin_file(self, part: PartInfo) -> None:
        self.content_type = check_content_type(part.content_type)
        principal = self.req.principal
        project_id = self.value("projectId")
        if project_id is None and principal.key is not None:
            project_id = principal.key.project_id  # a key reaches one project only; checked again at the end
        if project_id is not None:
            self.access = await self.authorize(project_id)
        bucket_ref, name = self.value("bucketId"), self.value("name") or part.filename
        if self.access is not None and bucket_ref and name and self.value("projectId") is not None:
            await self.begin_direct(self.access, bucket_ref, name)
            return
        if self.access is not None:
            limits = await self.svc.limits(self.svc.db, self.access.project_id)
            cap, self.cap_error = self.svc.upload_cap(limits)
        else:
            assert principal.user is not None
            cap, self.cap_error = await self.svc.session_cap(principal.user.id)
        self.check_announced_length(cap)
        self.staged_key = f"{STAGING_PREFIX}{uuid.uuid4()}"
        self.writer = self.new_writer(self.staged_key, cap)

    async def authorize(self, project_id: str | None) -> StorageAccess:
        r = self.req
        return await storage_access(
            self.svc.db, self.identity, r.principal, r.key_project, project_id, Op.WRITE, r.user_token
        )

    async def begin_direct(self, access: StorageAccess, bucket_ref: str, name: str) -> None:
        self.bucket = await self.svc.resolve_bucket(self.svc.db, access.project_id, bucket_ref)
        self.name = check_object_name(name)
        self.check_mime()
        upsert = self.upsert()
        self.used_values = {k: self.value(k) for k in _DESTINATION_FIELDS}
        self.used_values["name"] = self.name
        limits = await self.svc.limits(self.svc.db, access.project_id)
        self.lease = await self.svc.acquire(
            self.bucket, self.name, upsert=upsert, kind="stream", end_user=access.end_user
        )
        replaced = 0
        if self.lease.replacing:  # the old bytes make room
            replaced = (
                await self.svc.db.fetchval(
                    "SELECT size FROM fluxbase.objects WHERE id = $1", self.lease.row_id
                )
                or 0
            )
        cap, self.cap_error = self.svc.upload_cap(limits, replaced)
        self.check_announced_length(cap)
        self.last_beat = time.monotonic()
        self.writer = self.new_writer(self.lease.s3_key, cap)

    def new_writer(self, key: str, cap: int) -> S3Writer:
        return S3Writer(self.svc.store, key, self.content_type, self.svc.cfg.part_size, cap)

    def check_announced_length(self, cap: int) -> None:
        length = self.req.content_length
        if length is not None and length > cap + FORM_ENVELOPE:
            assert self.cap_error is not None
            raise self.cap_error

    def check_mime(self) -> None:
        assert self.bucket is not None
        if not mime_allowed(self.bucket.allowed_mime_types, self.content_type):
            allowed = ", ".join(self.bucket.allowed_mime_types or [])
            raise UnsupportedMediaType(
                f"Bucket {self.bucket.name!r} does not accept {self.content_type!r} (allowed: {allowed})."
            )

    async def write(self, data: bytes) -> None:
        assert self.writer is not None
        try:
            await self.writer.write(data)
        except FileTooLarge:
            assert self.cap_error is not None
            raise self.cap_error from None
        if self.lease is not None and time.monotonic() - self.last_beat > self.svc.lease_s / 3:
            self.last_beat = time.monotonic()
            await self.svc.heartbeat(self.lease)

    async def complete(self) -> StoredFile:
        assert self.writer is not None and self.file_part is not None
        size = await self.writer.finish()
        if self.lease is not None:  # direct: the destination must not have changed after the file part
            assert self.access is not None and self.bucket is not None
            now = {k: self.value(k) for k in _DESTINATION_FIELDS}
            now["name"] = self.value("name") or self.file_part.filename
            if now != self.used_values:
                raise ValidationError(
                    "projectId, bucketId, name and upsert must not change or repeat after the file part."
                )
            await self.svc.reserve(self.access.project_id, self.lease, size)
            await self.writer.commit()
            self.lease.committed = True
            return await self.svc.finalize(self.lease, size, self.content_type, self.bucket.is_public)
        return await self.complete_staged(size)

    async def complete_staged(self, size: int) -> StoredFile:
        assert self.writer is not None and self.file_part is not None and self.staged_key is not None
        await self.writer.commit()
        self.staged_committed = True
        self.access = await self.authorize(self.value("projectId"))
        self.bucket = await self.svc.resolve_bucket(
            self.svc.db, self.access.project_id, self.value("bucketId")
        )
        self.name = check_object_name(self.value("name") or self.file_part.filename)
        self.check_mime()
        lease = self.lease = await self.svc.acquire(
            self.bucket, self.name, upsert=self.upsert(), kind="stream", end_user=self.access.end_user
        )
        await self.svc.reserve(self.access.project_id, lease, size)
        await copy_object(self.svc.store, self.staged_key, lease.s3_key, size, self.content_type)
        lease.committed = True
        return await self.svc.finalize(lease, size, self.content_type, self.bucket.is_public)

    async def cleanup(self) -> None:
        """After success or failure: drop staging bytes, abort uncommitted parts, undo an uncommitted row."""
        steps: list[Callable[[], Awaitable[None]]] = []
        if self.writer is not None:
            steps.append(self.writer.abort)
        if self.staged_key is not None and self.staged_committed:
            key = self.staged_key
            steps.append(lambda: self.svc.delete_staging(key))
        if self.lease is not None and not self.lease.committed:
            lease = self.lease
            steps.append(lambda: self.svc.release(lease))
        for step in steps:
            try:
                await step()
            except Exception as exc:  # housekeeping finishes what cleanup cannot
                log.warning("upload cleanup step failed: %r", exc)
