"""End-user auth: register, log in, refresh before expiry (single-flight), log out, listeners."""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any

from fluxbase_client._models import AuthListener, Session
from fluxbase_client.errors import AuthError

if TYPE_CHECKING:
    from fluxbase_client._client import AsyncFluxbase


class Auth:
    """The project's own end users. Once logged in, every call carries X-Fluxbase-User-Token."""

    def __init__(self, client: AsyncFluxbase):
        self.client = client

    @property
    def _base(self) -> str:
        return f"/api/projects/{self.client.project_id}/auth"

    @property
    def session(self) -> Session | None:
        return self.client.session

    @property
    def user(self) -> dict[str, Any] | None:
        return self.client.session.user if self.client.session else None

    def on_change(self, listener: AuthListener) -> None:
        """Call `listener(event, session)` on SIGNED_IN, TOKEN_REFRESHED and SIGNED_OUT."""
        self.client._auth_listeners.append(listener)

    async def _emit(self, event: str) -> None:
        for listener in list(self.client._auth_listeners):
            out = listener(event, self.client.session)
            if inspect.isawaitable(out):
                await out

    async def _adopt(self, pair: dict[str, Any], event: str) -> Session:
        self.client.session = Session(
            access_token=pair["accessToken"],
            refresh_token=pair["refreshToken"],
            expires_at=float(pair["expiresAt"]),
            user=dict(pair.get("user") or {}),
        )
        await self._emit(event)
        return self.client.session

    async def register(self, email: str, password: str, display_name: str = "") -> dict[str, Any]:
        body = {"email": email, "password": password, "displayName": display_name}
        out = await self.client.request(
            "POST", f"{self._base}/register", json_body=body, idempotent=False, with_user=False
        )
        return dict(out["user"])

    async def login(self, email: str, password: str) -> Session:
        out = await self.client.request(
            "POST",
            f"{self._base}/login",
            json_body={"email": email, "password": password},
            idempotent=False,
            with_user=False,
        )
        return await self._adopt(out, "SIGNED_IN")

    async def set_session(self, access_token: str, refresh_token: str, expires_at: float) -> None:
        """Adopt a session kept elsewhere (a cookie, a keychain)."""
        self.client.session = Session(access_token, refresh_token, expires_at, {})
        await self._emit("SIGNED_IN")

    async def refresh(self, *, force: bool = True) -> Session:
        """Trade the refresh token for a new pair. Single-flight: concurrent callers wait for one
        refresh and share its result, because a refresh token works once and a second use
        revokes the whole session."""
        before = self.client.session
        if before is None:
            raise AuthError(401, "AUTH_REQUIRED", "Not logged in.")
        async with self.client._refresh_lock:
            current = self.client.session
            if current is None:
                raise AuthError(401, "AUTH_REQUIRED", "Logged out.")
            if current is not before or (not force and not self._due(current)):
                return current  # someone else refreshed while we waited
            try:
                out = await self.client.request(
                    "POST",
                    f"{self._base}/refresh",
                    json_body={"refreshToken": current.refresh_token},
                    idempotent=False,
                    with_user=False,
                )
            except AuthError:
                self.client.session = None
                await self._emit("SIGNED_OUT")
                raise
            return await self._adopt(out, "TOKEN_REFRESHED")

    def _due(self, s: Session) -> bool:
        return s.expires_at - time.time() <= self.client.refresh_margin_s

    async def access_token(self) -> str | None:
        """The current access token, refreshed first when it expires within the margin."""
        s = self.client.session
        if s is None:
            return None
        if self._due(s):
            s = await self.refresh(force=False)
        return s.access_token

    async def me(self) -> dict[str, Any]:
        token = await self.access_token()
        if token is None:
            raise AuthError(401, "AUTH_REQUIRED", "Not logged in.")
        out = await self.client.request(
            "GET", f"{self._base}/me", headers={"Authorization": f"Bearer {token}"}, with_user=False
        )
        return dict(out["user"])

    async def logout(self) -> None:
        """End the session on the server (its tokens stop working at once) and forget it."""
        s = self.client.session
        if s is None:
            return
        try:
            await self.client.request(
                "POST",
                f"{self._base}/logout",
                headers={"Authorization": f"Bearer {s.access_token}"},
                idempotent=False,
                with_user=False,
            )
        finally:
            self.client.session = None
            await self._emit("SIGNED_OUT")
