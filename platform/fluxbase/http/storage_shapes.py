"""Wire shapes of the storage endpoints: request Structs (camelCase) and response builders.

The upload response's file object keeps the reference doc's `s3_key` spelling; every other
field is camelCase like the rest of the API.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from fluxbase.errors import ValidationError
from fluxbase.http.shapes import Body
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
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as exc:
        raise ValidationError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationError("The request body must be JSON.") from None


def either(name: str, query: str | None, body: str | None) -> str | None:
    """One argument given in the query string or the JSON body (not two different values)."""
    if query is not None and body is not None and query != body:
        raise ValidationError(f"{name} differs between the query string and the body.")
    return body if body is not None else query


def limits_out(limits: Limits) -> dict[str, Any]:
    return {
        "maxFileSize": limits.max_file_size,
        "quotaBytes": limits.quota_bytes,
        "usedBytes": limits.used_bytes,
    }


def bucket_out(b: Bucket) -> dict[str, Any]:
    return {
        "id": b.id,
        "name": b.name,
        "isPublic": b.is_public,
        "allowedMimeTypes": b.allowed_mime_types,
        "endUserAccess": b.rules.out(),
        "fileCount": b.file_count,
        "size": b.size,
        "createdAt": b.created_at,
        "updatedAt": b.updated_at,
    }


def listing_out(listing: BucketListing) -> dict[str, Any]:
    return {
        "success": True,
        "buckets": [bucket_out(b) for b in listing.buckets],
        "totalSize": listing.total_size,
        "limits": limits_out(listing.limits),
    }


def file_out(f: StoredFile) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f.id,
        "name": f.name,
        "s3_key": f.s3_key,
        "size": f.size,
        "bucketId": f.bucket_id,
        "contentType": f.content_type,
        "createdAt": f.created_at,
        "updatedAt": f.updated_at,
    }
    if f.status != "ready":
        out["status"] = f.status
    if f.public_url is not None:
        out["publicUrl"] = f.public_url
    return out


def page_out(page: FilePage) -> dict[str, Any]:
    return {"success": True, "files": [file_out(f) for f in page.files], "nextCursor": page.next_cursor}


def signed_out(s: SignedUrl) -> dict[str, Any]:
    out: dict[str, Any] = {
        "success": True,
        "url": s.url,
        "expiresIn": s.expires_in,
        "expiresAt": s.expires_at,
    }
    if s.public_url is not None:
        out["publicUrl"] = s.public_url
    return out


def presigned_post_out(p: PresignedPost) -> dict[str, Any]:
    return {
        "success": True,
        "url": p.url,
        "fields": p.fields,
        "method": "POST",
        "expiresIn": p.expires_in,
        "expiresAt": p.expires_at,
        "maxSize": p.max_size,
        "file": file_out(p.file),
    }
