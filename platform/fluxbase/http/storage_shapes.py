"""Wire shapes of the storage endpoints: request Structs (camelCase) and response builders.

The upload response's file object keeps the reference doc's `s3_key` spelling; every other
field is camelCase like the rest of the API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import msgspec

from fluxbase.errors import ValidationError
from fluxbase.http.shapes import Answer, Body, Out, decode_body
from fluxbase.storage.service import (
    Bucket,
    BucketListing,
    FilePage,
    Limits,
    PresignedPost,
    SignedUrl,
    StoredFile,
)


class CreateBucketBody(Body):
    project_id: str
    name: str
    is_public: bool = False
    allowed_mime_types: list[str] | None = None
    # What end users (requests with an end-user token) may do: {"list"|"read"|"insert"|"update"|
    # "delete": "none"|"authenticated"|"owner"|"userFolder"}; left out means "none".
    end_user_access: dict[str, Any] | None = None


class UpdateBucketBody(Body):
    """Rename or change a bucket: `bucketId` (UUID or current name) and the new `name`; or the
    current `name` and `newName`."""

    project_id: str
    bucket_id: str | None = None
    name: str | None = None
    new_name: str | None = None
    is_public: bool | None = None
    allowed_mime_types: msgspec.UnsetType | list[str] | None = msgspec.UNSET
    end_user_access: dict[str, Any] | None = None  # operations to change; the others keep theirs


class BucketRefBody(Body):
    project_id: str | None = None
    bucket_id: str | None = None
    name: str | None = None


class DeleteFilesBody(Body):
    project_id: str | None = None
    s3_key: str | None = None
    s3_keys: list[str] | None = None


class UploadUrlBody(Body):
    project_id: str
    bucket_id: str
    name: str
    content_type: str | None = None
    size: int | None = None
    expires_in: int | None = None
    upsert: bool = False


class ConfirmUploadBody(Body):
    project_id: str
    file_id: str


T = TypeVar("T", bound=msgspec.Struct)


def decode_optional(raw: bytes, cls: type[T]) -> T:
    """A JSON body that may be absent (DELETE requests carry their arguments either way)."""
    if not raw.strip():
        return cls()
    return decode_body(raw, cls)


def either(name: str, query: str | None, body: str | None) -> str | None:
    """One argument given in the query string or the JSON body (not two different values)."""
    if query is not None and body is not None and query != body:
        raise ValidationError(f"{name} differs between the query string and the body.")
    return body if body is not None else query


class LimitsOut(Out):
    max_file_size: int
    quota_bytes: int
    used_bytes: int


class BucketOut(Out):
    id: str
    name: str
    is_public: bool
    allowed_mime_types: list[str] | None
    end_user_access: dict[str, str]
    file_count: int
    size: int
    created_at: datetime
    updated_at: datetime


class FileOut(Out):
    """A stored file; `status` only while it is not ready, `publicUrl` only in a public bucket."""

    id: str
    name: str
    s3_key: str = msgspec.field(name="s3_key")
    size: int
    bucket_id: str
    content_type: str
    created_at: datetime
    updated_at: datetime
    status: str | msgspec.UnsetType = msgspec.UNSET
    public_url: str | msgspec.UnsetType = msgspec.UNSET


class BucketsAnswer(Answer, kw_only=True):
    buckets: list[BucketOut]
    total_size: int
    limits: LimitsOut


class BucketAnswer(Answer, kw_only=True):
    bucket: BucketOut


class FileAnswer(Answer, kw_only=True):
    file: FileOut


class FilesAnswer(Answer, kw_only=True):
    files: list[FileOut]
    next_cursor: str | None


class FilesDeleted(Answer, kw_only=True):
    deleted: list[str]
    not_found: list[str]


class SignedUrlAnswer(Answer, kw_only=True):
    url: str
    expires_in: int
    expires_at: datetime
    public_url: str | msgspec.UnsetType = msgspec.UNSET


class PresignedPostAnswer(Answer, kw_only=True):
    url: str
    fields: dict[str, str]
    method: str
    expires_in: int
    expires_at: datetime
    max_size: int
    file: FileOut


def limits_out(limits: Limits) -> LimitsOut:
    return LimitsOut(limits.max_file_size, limits.quota_bytes, limits.used_bytes)


def bucket_out(b: Bucket) -> BucketOut:
    return BucketOut(
        b.id,
        b.name,
        b.is_public,
        b.allowed_mime_types,
        b.rules.out(),
        b.file_count,
        b.size,
        b.created_at,
        b.updated_at,
    )


def listing_out(listing: BucketListing) -> BucketsAnswer:
    return BucketsAnswer(
        buckets=[bucket_out(b) for b in listing.buckets],
        total_size=listing.total_size,
        limits=limits_out(listing.limits),
    )


def file_out(f: StoredFile) -> FileOut:
    return FileOut(
        f.id,
        f.name,
        f.s3_key,
        f.size,
        f.bucket_id,
        f.content_type,
        f.created_at,
        f.updated_at,
        f.status if f.status != "ready" else msgspec.UNSET,
        f.public_url if f.public_url is not None else msgspec.UNSET,
    )


def page_out(page: FilePage) -> FilesAnswer:
    return FilesAnswer(files=[file_out(f) for f in page.files], next_cursor=page.next_cursor)


def signed_out(s: SignedUrl) -> SignedUrlAnswer:
    return SignedUrlAnswer(
        url=s.url,
        expires_in=s.expires_in,
        expires_at=s.expires_at,
        public_url=s.public_url if s.public_url is not None else msgspec.UNSET,
    )


def presigned_post_out(p: PresignedPost) -> PresignedPostAnswer:
    return PresignedPostAnswer(
        url=p.url,
        fields=p.fields,
        method="POST",
        expires_in=p.expires_in,
        expires_at=p.expires_at,
        max_size=p.max_size,
        file=file_out(p.file),
    )
