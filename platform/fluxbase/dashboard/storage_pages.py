"""Storage: buckets (create, rename, public/private, delete) and a file browser with folders by
prefix, upload with a progress bar, download, links and delete (StorageService and
storage.access, exactly as the API's /api/storage endpoints use them)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Redirect

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import error_response
from fluxbase.http.storage_shapes import file_out, presigned_post_out
from fluxbase.services.access import Need
from fluxbase.storage.access import Op, StorageAccess, storage_access
from fluxbase.storage.service import BucketPatch, StorageService
from fluxbase.storage.uploads import UploadRequest, stream_upload

from .web import Dash, form, signed_in

PAGE = 1000
# Files from this size up go from the browser straight to S3 through the API's presigned POST
# (createUploadUrl + confirmUpload); smaller ones stream through the API in one request.
DIRECT_UPLOAD_BYTES = 8 * 1024 * 1024


def _svc(ctx: AppContext) -> StorageService:
    return StorageService(ctx.db, ctx.store, ctx.settings)


async def _sa(dash: Dash, op: Op) -> StorageAccess:
    assert dash.principal is not None and dash.access is not None
    return await storage_access(
        dash.ctx.db, dash.ctx.identity, dash.principal, None, dash.access.project.id, op, None
    )


async def _buckets_page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    listing = await _svc(dash.ctx).list_buckets(await _sa(dash, Op.READ))
    return dash.render("storage.html", status, listing=listing, **extra)


@get("/p/{project_id:str}/storage")
async def storage_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _buckets_page(dash)


@post("/p/{project_id:str}/storage", status_code=200)
async def create_bucket(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.SCHEMA)
    data = await form(request)
    try:
        bucket = await _svc(ctx).create_bucket(
            access, data.get("name", "").strip(), data.get("public") == "on"
        )
    except FluxbaseError as exc:
        return await _buckets_page(dash, exc.status, error=exc)
    return dash.redirect(f"/p/{project_id}/storage/{bucket.id}")


def _split(names: list[str], prefix: str) -> tuple[list[str], set[str]]:
    """Folders directly under `prefix` (names with a further "/"), and the files directly in it."""
    folders, direct = [], set()
    for name in names:
        rest = name[len(prefix) :]
        if "/" in rest:
            folder = prefix + rest.split("/", 1)[0] + "/"
            if folder not in folders:
                folders.append(folder)
        else:
            direct.add(name)
    return folders, direct


async def _bucket_page(
    dash: Dash, bucket_id: str, prefix: str, status: int = 200, **extra: Any
) -> Response[Any]:
    sa = await _sa(dash, Op.READ)
    svc = _svc(dash.ctx)
    listing = await svc.list_buckets(sa)
    bucket = next((b for b in listing.buckets if bucket_id in (b.id, b.name)), None)
    if bucket is None:
        return await _buckets_page(dash, 404, error_message="No such bucket in this project.")
    page = await svc.list_files(sa, bucket.id, prefix=prefix, limit=PAGE)
    folders, direct = _split([f.name for f in page.files], prefix)
    files = [f for f in page.files if f.name in direct]
    crumbs = []
    parts = prefix.split("/")[:-1]
    for i, part in enumerate(parts):
        crumbs.append((part, "/".join(parts[: i + 1]) + "/"))
    return dash.render(
        "bucket.html",
        status,
        bucket=bucket,
        prefix=prefix,
        folders=folders,
        files=files,
        more=page.next_cursor is not None,
        crumbs=crumbs,
        direct_min=DIRECT_UPLOAD_BYTES,
        **extra,
    )


@get("/p/{project_id:str}/storage/{bucket_id:str}")
async def bucket_page(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext, prefix: str = ""
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _bucket_page(dash, bucket_id, prefix)


@post("/p/{project_id:str}/storage/{bucket_id:str}/settings", status_code=200)
async def update_bucket(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.SCHEMA)
    data = await form(request)
    try:
        if data.get("delete") == "yes":
            gone = await _svc(ctx).delete_bucket(access, bucket_id)
            return await _buckets_page(dash, notice=f"Bucket {gone.name} deleted.")
        change = BucketPatch(name=data.get("name", "").strip() or None, is_public=data.get("public") == "on")
        bucket = await _svc(ctx).update_bucket(access, bucket_id, change)
    except FluxbaseError as exc:
        return await _bucket_page(dash, bucket_id, "", exc.status, error=exc)
    return await _bucket_page(dash, bucket.id, "", notice="Bucket settings saved.")


@post("/p/{project_id:str}/storage/{bucket_id:str}/upload", status_code=201)
async def upload(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext, name: str = ""
) -> Response[Any]:
    """The API's streamed upload (multipart, straight to S3), for the page's upload script."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.WRITE)
    assert dash.principal is not None
    length = request.headers.get("content-length")
    req = UploadRequest(
        principal=dash.principal,
        key_project=None,
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length and length.isdigit() else None,
        query={"projectId": access.project.id, "bucketId": bucket_id, **({"name": name} if name else {})},
    )
    try:
        file = await stream_upload(_svc(ctx), ctx.identity, req, request.stream())
    except FluxbaseError as exc:
        return error_response(exc)  # the API's error body, for the upload script to show
    return Response({"success": True, "name": file.name, "size": file.size}, status_code=201)


@post("/p/{project_id:str}/storage/{bucket_id:str}/upload-url", status_code=201)
async def upload_url(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    """The API's createUploadUrl: a presigned POST form for one file of a declared size and type,
    which the page's upload script sends straight to S3 (with progress), then confirms."""
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.WRITE)
    data = await form(request)
    size = data.get("size", "")
    try:
        post_form = await _svc(ctx).create_upload_url(
            await _sa(dash, Op.WRITE),
            bucket_id,
            data.get("name", ""),
            content_type=data.get("contentType") or None,
            size=int(size) if size.isdigit() else None,
            expires_in=None,
            upsert=False,
        )
    except FluxbaseError as exc:
        return error_response(exc)
    return Response(presigned_post_out(post_form), status_code=201)


@post("/p/{project_id:str}/storage/{bucket_id:str}/upload-confirm", status_code=200)
async def upload_confirm(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    """The API's confirmUpload: register the bytes the browser POSTed to S3."""
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.WRITE)
    try:
        file = await _svc(ctx).confirm_upload(await _sa(dash, Op.WRITE), (await form(request)).get("fileId"))
    except FluxbaseError as exc:
        return error_response(exc)
    return Response({"success": True, "file": file_out(file)}, status_code=200)


@get("/p/{project_id:str}/storage-file")
async def download(
    project_id: str, request: Request[Any, Any, Any], ctx: AppContext, key: str = ""
) -> Response[Any]:
    """Download: a redirect to the file's presigned URL (15 minutes), as the API signs it."""
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    signed = await _svc(ctx).sign_download(await _sa(dash, Op.READ), key, None)
    return dash.finish(Redirect(signed.url, status_code=303))


@post("/p/{project_id:str}/storage/{bucket_id:str}/file", status_code=200)
async def file_action(
    project_id: str, bucket_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    """link (a presigned URL to copy) or delete, for one file."""
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    data = await form(request)
    key, prefix = data.get("key", ""), data.get("prefix", "")
    try:
        if data.get("action") == "delete":
            deleted, _ = await _svc(ctx).delete_files(await _sa(dash, Op.DELETE), [key], single=True)
            return await _bucket_page(
                dash, bucket_id, prefix, notice=f"Deleted {deleted[0].rsplit('/', 1)[-1]}."
            )
        signed = await _svc(ctx).sign_download(await _sa(dash, Op.READ), key, None)
    except FluxbaseError as exc:
        return await _bucket_page(dash, bucket_id, prefix, exc.status, error=exc)
    return await _bucket_page(dash, bucket_id, prefix, link=signed)


ROUTES = [
    storage_page,
    create_bucket,
    bucket_page,
    update_bucket,
    upload,
    upload_url,
    upload_confirm,
    download,
    file_action,
]
