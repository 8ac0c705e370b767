"""API keys: list with last use, create (scope, expiry, origins, requireUserAuth), rotate, revoke.

A new or rotated key's secret is in the body of the POST's own answer, once: never in a URL, a
cookie or a redirect, and the page is `no-store` (security.headers_middleware).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.services import apikeys
from fluxbase.services.access import Need

from .web import Dash, form, signed_in


async def _page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    keys = await apikeys.list_keys(dash.ctx.db, dash.access.project.id) if dash.can(Need.MANAGE) else []
    extra.setdefault("values", {})
    return dash.render("keys.html", status, keys=keys, **extra)


@get("/p/{project_id:str}/keys")
async def keys_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _page(dash)


def _origins(text: str) -> list[str]:
    return [o.strip() for o in text.replace(",", "\n").splitlines() if o.strip()]


def _days(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValidationError("expiresInDays must be a whole number of days.")
    return int(text)


@post("/p/{project_id:str}/keys", status_code=200)
async def create_key(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    try:
        raw, key = await apikeys.create_key(
            ctx.db,
            access,
            name=data.get("name", ""),
            scope=data.get("scope", ""),
            expires_in_days=_days(data.get("expires_in_days", "")),
            allowed_origins=_origins(data.get("allowed_origins", "")),
            require_user_auth=data.get("require_user_auth") == "on",
        )
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc, values=data)
    return await _page(dash, new_key=raw, new_key_meta=key, what="created")


@post("/p/{project_id:str}/keys/{key_id:str}/rotate", status_code=200)
async def rotate_key(
    project_id: str, key_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        raw, key = await apikeys.rotate_key(ctx.db, access, key_id)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, new_key=raw, new_key_meta=key, what="rotated")


@post("/p/{project_id:str}/keys/{key_id:str}/revoke", status_code=200)
async def revoke_key(
    project_id: str, key_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        key = await apikeys.revoke_key(ctx.db, access, key_id)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, notice=f"Key {key.name} ({key.prefix}…) is revoked.")


ROUTES = [keys_page, create_key, rotate_key, revoke_key]
