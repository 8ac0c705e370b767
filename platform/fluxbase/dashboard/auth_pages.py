"""Sign in, sign out, first-admin setup and registration (services.accounts, as the API's)."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import client_ip
from fluxbase.services import accounts

from . import security
from .web import Dash, form, session_principal, signed_in


def _signed_in_response(dash: Dash, session: accounts.Session) -> Response[Any]:
    """Start the browser session: the session cookie, and a fresh CSRF basis for it."""
    max_age = max(1, session.expires_at - int(time.time()))
    dash.cookies.append((security.SESSION_COOKIE, session.token, max_age))
    dash.cookies.append((security.CSRF_COOKIE, security.new_csrf_basis(), None))
    return dash.redirect("/")


@get("/sign-in")
async def sign_in_page(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = Dash(request, ctx, await session_principal(request, ctx))
    if dash.principal is not None:
        return dash.redirect("/")
    if not await accounts.admin_exists(ctx.db):
        return dash.redirect("/setup")
    return dash.render("sign_in.html", registration=ctx.settings.auth.allow_registration, email="")


@post("/sign-in", status_code=200)
async def sign_in(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = Dash(request, ctx)
    data = await form(request)
    email = data.get("email", "")
    try:
        session = await accounts.login(
            ctx.db, ctx.settings, email, data.get("password", ""), client_ip(request, ctx)
        )
    except FluxbaseError as exc:
        return dash.render(
            "sign_in.html",
            exc.status,
            error=exc,
            email=email,
            registration=ctx.settings.auth.allow_registration,
        )
    return _signed_in_response(dash, session)


async def _register_page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    first = not await accounts.admin_exists(dash.ctx.db)
    if not first and not dash.ctx.settings.auth.allow_registration:
        return dash.redirect("/sign-in")
    extra.setdefault("email", "")
    extra.setdefault("display_name", "")
    return dash.render("register.html", status, first=first, **extra)


@get("/setup")
async def setup_page(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    return await _register_page(Dash(request, ctx))


@get("/register")
async def register_page(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    return await _register_page(Dash(request, ctx))


@post("/register", status_code=200)
async def register(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = Dash(request, ctx)
    data = await form(request)
    email, name = data.get("email", ""), data.get("display_name", "")
    try:
        if data.get("password", "") != data.get("password2", ""):
            return await _register_page(
                dash, 400, error_message="The two passwords differ.", email=email, display_name=name
            )
        user = await accounts.register(
            ctx.db, ctx.settings, email, data.get("password", ""), name, client_ip(request, ctx)
        )
        session = await accounts.start_session(ctx.db, ctx.settings, user)
    except FluxbaseError as exc:
        return await _register_page(dash, exc.status, error=exc, email=email, display_name=name)
    return _signed_in_response(dash, session)


@post("/sign-out", status_code=200)
async def sign_out(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """End the session server-side (the token stops working everywhere), then drop the cookies."""
    principal = await session_principal(request, ctx)
    if principal is not None and principal.session_id is not None:
        await accounts.logout(ctx.db, principal.session_id)
    dash = Dash(request, ctx)
    dash.clear.append(security.SESSION_COOKIE)
    dash.cookies.append((security.CSRF_COOKIE, security.new_csrf_basis(), None))
    return dash.redirect("/sign-in")


@get("/forgot")
async def forgot_page(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    return Dash(request, ctx).render("account_reset.html", token="", email="")


@post("/forgot", status_code=200)
async def forgot(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's POST /api/auth/recover: the same answer whether or not the address has an account."""
    dash = Dash(request, ctx)
    email = (await form(request)).get("email", "")
    try:
        await accounts.request_reset(ctx.db, ctx.settings, email, client_ip(request, ctx))
    except FluxbaseError as exc:
        return dash.render("account_reset.html", exc.status, error=exc, token="", email=email)
    notice = f"If {email} has an account, a link to choose a new password is on its way."
    return dash.render("account_reset.html", notice=notice, token="", email=email)


@get("/reset-password")
async def reset_page(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """Where the account_reset message's link lands (the token is checked when the form is sent)."""
    token = request.query_params.get("token", "")
    if not token:
        return Dash(request, ctx).redirect("/forgot")
    return Dash(request, ctx).render("account_reset.html", token=token, email="")


@post("/reset-password", status_code=200)
async def reset(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's POST /api/auth/reset-password: every session of the account ends."""
    dash = Dash(request, ctx)
    data = await form(request)
    token = data.get("token", "")
    if data.get("password", "") != data.get("password2", ""):
        return dash.render("account_reset.html", 400, error_message="The two passwords differ.", token=token)
    try:
        await accounts.reset_password(ctx.db, token, data.get("password", ""))
    except FluxbaseError as exc:
        return dash.render("account_reset.html", exc.status, error=exc, token=token)
    return dash.render(
        "sign_in.html",
        notice="Your password is changed. Sign in with it.",
        email="",
        registration=ctx.settings.auth.allow_registration,
    )


@get("/invites")
async def invitation_link(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """Where an invitation message's link lands: the projects page lists the signed-in user's
    invitations to accept or reject (signing in first, as the invited address)."""
    await signed_in(request, ctx)
    return Dash(request, ctx).redirect("/")


ROUTES = [
    sign_in_page,
    sign_in,
    setup_page,
    register_page,
    register,
    sign_out,
    forgot_page,
    forgot,
    reset_page,
    reset,
    invitation_link,
]
