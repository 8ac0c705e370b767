"""Storage v2: buckets, streamed uploads, presigned URLs (the reference doc's endpoints, and a few more).

Scopes: `read` lists and signs downloads, `readwrite` uploads, `admin` manages buckets and
deletes files (members: viewer / developer / developer, as in services/access.py). A request
with an end-user token acts as that user under each bucket's end-user rules, and a
`requireUserAuth` key needs one (storage/access.py, docs/storage-access.md).
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, delete, get, patch, post
from litestar.params import Parameter, QueryParameter
from litestar.response import Stream

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.storage_shapes import (
    BucketAnswer,
    BucketRefBody,
    BucketsAnswer,
    ConfirmUploadBody,
    CreateBucketBody,
    DeleteFilesBody,
    FileAnswer,
    FilesAnswer,
    FilesDeleted,
    PresignedPostAnswer,
    SignedUrlAnswer,
    UpdateBucketBody,
    UploadUrlBody,
    bucket_out,
    decode_optional,
    either,
    file_out,
    listing_out,
    page_out,
    presigned_post_out,
    signed_out,
)
from fluxbase.services.access import Need
from fluxbase.storage.access import Op, StorageAccess, storage_access
from fluxbase.storage.service import BucketPatch, StorageService
from fluxbase.storage.uploads import UploadRequest, stream_upload

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]
BucketQ = Annotated[str | None, QueryParameter(name="bucketId", required=False)]
KeyQ = Annotated[str | None, QueryParameter(name="s3Key", required=False)]


USER_TOKEN_HEADER = "x-fluxbase-user-token"  # noqa: S105 (a header name)


def _svc(ctx: AppContext) -> StorageService:
    return StorageService(ctx.db, ctx.store, ctx.settings)


async def _files_access(
    request: Request[Any, Any, Any], ctx: AppContext, caller: Caller, project_id: str | None, op: Op
) -> StorageAccess:
    return await storage_access(
        ctx.db,
        ctx.identity,
        caller.principal,
        caller.key_project,
        project_id,
        op,
        request.headers.get(USER_TOKEN_HEADER),
    )


@get("/api/storage/buckets", operation_id="listBuckets", tags=["storage"])
async def list_buckets(
    request: Request[Any, Any, Any], ctx: AppContext, caller: Caller, project_id: ProjectQ = None
) -> BucketsAnswer:
    sa = await _files_access(request, ctx, caller, project_id, Op.READ)
    return listing_out(await _svc(ctx).list_buckets(sa))


@post("/api/storage/buckets", operation_id="createBucket", tags=["storage"], status_code=201)
async def create_bucket(data: CreateBucketBody, ctx: AppContext, caller: Caller) -> BucketAnswer:
    access = await caller.access(ctx, data.project_id, Need.SCHEMA)
    bucket = await _svc(ctx).create_bucket(
        access, data.name, data.is_public, data.allowed_mime_types, data.end_user_access
    )
    return BucketAnswer(bucket=bucket_out(bucket))


@patch("/api/storage/buckets", operation_id="updateBucket", tags=["storage"])
async def update_bucket(data: UpdateBucketBody, ctx: AppContext, caller: Caller) -> BucketAnswer:
    access = await caller.access(ctx, data.project_id, Need.SCHEMA)
    ref, new_name = (data.bucket_id, data.name) if data.bucket_id is not None else (data.name, data.new_name)
    types = data.allowed_mime_types
    change = BucketPatch(
        name=new_name,
        is_public=data.is_public,
        clear_mime_types=types is None,
        allowed_mime_types=types if isinstance(types, list) else None,
        end_user_access=data.end_user_access,
    )
    return BucketAnswer(bucket=bucket_out(await _svc(ctx).update_bucket(access, ref, change)))


@delete("/api/storage/buckets", operation_id="deleteBucket", tags=["storage"], status_code=200)
async def delete_bucket(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: ProjectQ = None,
    bucket_id: BucketQ = None,
) -> BucketAnswer:
    body = decode_optional(await request.body(), BucketRefBody)
    access = await caller.access(ctx, either("projectId", project_id, body.project_id), Need.SCHEMA)
    ref = either("bucketId", bucket_id, body.bucket_id or body.name)
    bucket = await _svc(ctx).delete_bucket(access, ref)
    return BucketAnswer(bucket=bucket_out(bucket))


@post(
    "/api/storage/upload",
    operation_id="uploadFile",
    tags=["storage"],
    status_code=201,
    request_max_body_size=None,
    description="multipart/form-data: file, bucketId (UUID or name), projectId; streamed to S3.",
)
async def upload_file(request: Request[Any, Any, Any], ctx: AppContext, caller: Caller) -> FileAnswer:
    length = request.headers.get("content-length")
    req = UploadRequest(
        principal=caller.principal,
        key_project=caller.key_project,
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length and length.isdigit() else None,
        query=dict(request.query_params.items()),
        upsert_header=request.headers.get("x-upsert"),
        user_token=request.headers.get(USER_TOKEN_HEADER),
    )
    file = await stream_upload(_svc(ctx), ctx.identity, req, request.stream())
    return FileAnswer(file=file_out(file))


@get("/api/storage/files", operation_id="listFiles", tags=["storage"])
async def list_files(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: ProjectQ = None,
    bucket_id: BucketQ = None,
    prefix: str = "",
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> FilesAnswer:
    sa = await _files_access(request, ctx, caller, project_id, Op.READ)
    return page_out(await _svc(ctx).list_files(sa, bucket_id, prefix=prefix, limit=limit, cursor=cursor))


@get("/api/storage/url", operation_id="getFileUrl", tags=["storage"])
async def file_url(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: ProjectQ = None,
    s3_key: KeyQ = None,
    expires_in: Annotated[int | None, QueryParameter(name="expiresIn", required=False)] = None,
) -> SignedUrlAnswer:
    sa = await _files_access(request, ctx, caller, project_id, Op.READ)
    return signed_out(await _svc(ctx).sign_download(sa, s3_key, expires_in))


async def _delete_files(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: str | None,
    s3_key: str | None,
) -> FilesDeleted:
    body = decode_optional(await request.body(), DeleteFilesBody)
    sa = await _files_access(
        request, ctx, caller, either("projectId", project_id, body.project_id), Op.DELETE
    )
    single = either("s3Key", s3_key, body.s3_key)
    keys: list[object] = [*([single] if single is not None else []), *(body.s3_keys or [])]
    deleted, missing = await _svc(ctx).delete_files(sa, keys, single=single is not None and not body.s3_keys)
    return FilesDeleted(deleted=deleted, not_found=missing)


@delete("/api/storage/files", operation_id="deleteFiles", tags=["storage"], status_code=200)
async def delete_files(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: ProjectQ = None,
    s3_key: KeyQ = None,
) -> FilesDeleted:
    return await _delete_files(request, ctx, caller, project_id, s3_key)


@delete("/api/storage/delete", operation_id="deleteFile", tags=["storage"], status_code=200)
async def delete_file(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    caller: Caller,
    project_id: ProjectQ = None,
    s3_key: KeyQ = None,
) -> FilesDeleted:
    return await _delete_files(request, ctx, caller, project_id, s3_key)


@post("/api/storage/upload-url", operation_id="createUploadUrl", tags=["storage"], status_code=201)
async def create_upload_url(
    request: Request[Any, Any, Any], data: UploadUrlBody, ctx: AppContext, caller: Caller
) -> PresignedPostAnswer:
    sa = await _files_access(request, ctx, caller, data.project_id, Op.WRITE)
    post_form = await _svc(ctx).create_upload_url(
        sa,
        data.bucket_id,
        data.name,
        content_type=data.content_type,
        size=data.size,
        expires_in=data.expires_in,
        upsert=data.upsert,
    )
    return presigned_post_out(post_form)


@post("/api/storage/upload-url/confirm", operation_id="confirmUpload", tags=["storage"], status_code=200)
async def confirm_upload(
    request: Request[Any, Any, Any], data: ConfirmUploadBody, ctx: AppContext, caller: Caller
) -> FileAnswer:
    sa = await _files_access(request, ctx, caller, data.project_id, Op.WRITE)
    return FileAnswer(file=file_out(await _svc(ctx).confirm_upload(sa, data.file_id)))


@get("/api/storage/public/{key:path}", operation_id="getPublicFile", tags=["storage"])
async def public_file(key: str, request: Request[Any, Any, Any], ctx: AppContext) -> Stream:
    obj = await _svc(ctx).open_public(key.lstrip("/"), request.headers.get("range"))
    headers = {
        "Content-Length": str(obj.size),
        "Accept-Ranges": "bytes",
        # User content on the API's origin: never sniffed, never scripted.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Cache-Control": "public, max-age=60",
    }
    if obj.content_range:
        headers["Content-Range"] = obj.content_range
    if obj.etag:
        headers["ETag"] = obj.etag
    return Stream(obj.chunks, status_code=obj.status, media_type=obj.content_type, headers=headers)
