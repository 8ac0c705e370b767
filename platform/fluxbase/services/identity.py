"""Who a data call runs for: end-user tokens (own or external) and `authUid`, as an sql.Identity.

`IdentityResolver.identity` is the one function every data endpoint uses to turn the request's
end-user token (`X-Fluxbase-User-Token`) or `authUid` into the identity that `auth.uid()` and
`auth.jwt()` return. Tokens are verified before any tenant connection is borrowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import asyncpg
import jwt

from fluxbase.config import EndUserSettings, Settings
from fluxbase.errors import IdentityProviderUnavailable, InvalidUserToken, ValidationError
from fluxbase.security import ssrf, usertokens
from fluxbase.services import end_users
from fluxbase.services.access import ProjectAccess, require_end_user_token
from fluxbase.tenancy.identity import Identity, base_claims

log = logging.getLogger("fluxbase.identity")

MAX_JWKS_BYTES = 1024 * 1024
MAX_AUTH_UID = 256
# A project's auth settings are reused this long per process (a PATCH clears them at once in the
# process that served it; other processes and replicas follow within this many seconds).
CONFIG_CACHE_S = 5.0
CONFIG_CACHE_MAX = 10_000
# Verified tokens are remembered for as long as settings are (and never past their `exp`), so a
# client reusing its token does not pay for parsing and signature checks on every request.
TOKEN_CACHE_MAX = 2_000
TOKEN_CACHE_MAX_CHARS = 4_096


class JwksCache:
    """Per-process JWKS cache: fetched with a timeout, reused for `jwks_cache_s`, refetched on
    an unknown `kid` at most every `jwks_min_refresh_s` (so junk tokens cannot hammer the IdP)."""

    def __init__(self, settings: EndUserSettings, policy: ssrf.Policy | None = None):
        self._s = settings
        self._policy = policy or ssrf.Policy()  # the SSRF guard's allow-list
        self._sets: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._keys: dict[tuple[str, str | None, str, int], Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[float, IdentityProviderUnavailable]] = {}

    async def key(self, uri: str, kid: str | None, alg: str) -> Any:
        entry = self._sets.get(uri)
        if entry is None or time.monotonic() - entry[0] > self._s.jwks_cache_s:
            entry = await self._refresh(uri, entry)
        found = self._pick(uri, entry, kid, alg)
        if found is None and time.monotonic() - entry[0] >= self._s.jwks_min_refresh_s:
            entry = await self._refresh(uri, entry)
            found = self._pick(uri, entry, kid, alg)
        if found is None:
            raise InvalidUserToken(f"No key in the project's JWKS matches the token's kid ({kid!r}).")
        return found

    def _pick(
        self, uri: str, entry: tuple[float, list[dict[str, Any]]], kid: str | None, alg: str
    ) -> Any | None:
        candidates = [k for k in entry[1] if kid is None or k.get("kid") == kid]
        if not candidates:
            return None
        for jwk in candidates:
            if alg in usertokens.jwk_algorithms(jwk):
                memo = (uri, kid, alg, id(jwk))
                if memo not in self._keys:
                    try:
                        self._keys[memo] = jwt.PyJWK(jwk, algorithm=alg).key
                    except jwt.PyJWTError:
                        continue
                return self._keys[memo]
        raise InvalidUserToken(f"The token's algorithm {alg} does not match the type of its signing key.")

    async def _refresh(
        self, uri: str, stale: tuple[float, list[dict[str, Any]]] | None
    ) -> tuple[float, list[dict[str, Any]]]:
        lock = self._locks.setdefault(uri, asyncio.Lock())
        async with lock:
            current = self._sets.get(uri)
            if current is not None and current is not stale:
                return current  # another request refreshed it while we waited
            failed = self._failed.get(uri)
            if stale is None and failed and time.monotonic() - failed[0] < self._s.jwks_min_refresh_s:
                # A failing IdP is not asked again on every request; the same answer is repeated.
                raise IdentityProviderUnavailable(failed[1].message)
            try:
                keys = await self._fetch(uri)
            except IdentityProviderUnavailable as exc:
                self._failed[uri] = (time.monotonic(), exc)
                if stale is None:
                    raise
                # Keep serving the last good set, but do not retry before the refresh interval.
                entry = (time.monotonic(), stale[1])
                self._sets[uri] = entry
                return entry
            entry = (time.monotonic(), keys)
            self._sets[uri] = entry
            self._failed.pop(uri, None)
            self._keys = {k: v for k, v in self._keys.items() if k[0] != uri}
            return entry

    async def _fetch(self, uri: str) -> list[dict[str, Any]]:
        # Through the one SSRF guard: the address checked is the address connected to.
        http = ssrf.OutboundClient(self._policy, limit=1)
        try:
            async with http.request(
                "GET", uri, headers={"Accept": "application/json"}, timeout_s=self._s.jwks_timeout_s
            ) as resp:
                if resp.status != 200:
                    raise IdentityProviderUnavailable(f"The project's JWKS endpoint answered {resp.status}.")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise IdentityProviderUnavailable("The project's JWKS document is too large.")
        except ssrf.ForbiddenTarget:
            raise IdentityProviderUnavailable(
                "The project's jwksUri resolves to a private or otherwise non-public address "
                "(reachable only through FLUXBASE_OUTBOUND_ALLOW_NETWORKS)."
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError, ValidationError) as exc:
            log.warning("JWKS fetch from %s failed: %r", uri, exc)
            raise IdentityProviderUnavailable() from None
        finally:
            await http.close()
        try:
            doc = json.loads(body)
            keys = doc["keys"]
            if not isinstance(keys, list):
                raise TypeError("keys is not a list")
        except (ValueError, KeyError, TypeError):
            raise IdentityProviderUnavailable(
                "The project's JWKS document is not a JSON Web Key Set."
            ) from None
        return [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig"]


def key_identity(access: ProjectAccess, auth_uid: str | None) -> Identity:
    """The identity an API key or session asserts with `authUid` (a trusted server's claim)."""
    if auth_uid is not None and (len(auth_uid) > MAX_AUTH_UID or "\x00" in auth_uid):
        raise ValidationError("authUid must be at most 256 characters.")
    claims = base_claims(access.sql_scope, access.project.id)
    if auth_uid:
        claims["sub"] = auth_uid
    return Identity(uid=auth_uid or None, claims=claims, role=access.sql_scope)


def end_user_identity(scope: str, claims: dict[str, Any], session: tuple[str, str] | None = None) -> Identity:
    """A verified end user as SQL (and the realtime checker) sees them: auth.role() is the SQL
    scope of the key that admitted them (`read` for a token presented on its own), never the
    token's `role` claim, which an external identity provider may set to anything."""
    return Identity(uid=claims["sub"], claims=claims, role=scope, user_session=session, end_user=True)


class IdentityResolver:
    """Verifies end-user tokens for a project and builds the request's Identity."""

    def __init__(self, db: asyncpg.Pool, settings: Settings):
        self.db = db
        self.settings = settings
        self.jwks = JwksCache(settings.end_user, ssrf.Policy.of(settings))
        self._configs: dict[str, tuple[float, end_users.AuthConfig]] = {}
        self._verified: dict[tuple[str, str, bool], tuple[float, float, dict[str, Any]]] = {}

    def forget(self, project_id: str) -> None:
        """Drop a project's cached auth settings and verified tokens (after settings changed)."""
        self._configs.pop(project_id, None)
        self._verified = {k: v for k, v in self._verified.items() if k[0] != project_id}

    async def _config(self, project_id: str) -> end_users.AuthConfig:
        now = time.monotonic()
        hit = self._configs.get(project_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        cfg = await end_users.get_config(self.db, project_id)
        if len(self._configs) >= CONFIG_CACHE_MAX:
            self._configs.clear()
        self._configs[project_id] = (now + CONFIG_CACHE_S, cfg)
        return cfg

    async def claims(
        self, project_id: str, token: str, *, session_checked_later: bool = False
    ) -> dict[str, Any]:
        """Verified claims of an own or external token for this project, or a 401 naming why.

        With `session_checked_later`, an own token's session is not looked up here: the caller
        promises to run fluxbase_guard.check_user_session (sql.Identity.user_session does).
        """
        memo = (project_id, token, session_checked_later)
        hit = self._verified.get(memo)
        if hit is not None and hit[0] > time.monotonic() and hit[1] > time.time():
            return hit[2]
        claims = await self._verify(project_id, token, session_checked_later)
        own = claims.get("iss") == usertokens.OWN_ISSUER
        # Own tokens whose session is checked here (by a query) must not skip it next time.
        if len(token) <= TOKEN_CACHE_MAX_CHARS and (session_checked_later or not own):
            if len(self._verified) >= TOKEN_CACHE_MAX:
                self._verified.clear()
            exp = float(claims["exp"])  # PyJWT accepted it as a number
            self._verified[memo] = (time.monotonic() + CONFIG_CACHE_S, exp, claims)
        return claims

    async def _verify(self, project_id: str, token: str, session_checked_later: bool) -> dict[str, Any]:
        header = usertokens.peek(token)
        if header.issuer == usertokens.OWN_ISSUER:
            if session_checked_later:
                return end_users.verify_own_signature(self.settings, project_id, token)
            claims, _ = await end_users.verify_own(self.db, self.settings, project_id, token)
            return claims
        cfg = await self._config(project_id)
        key: Any
        if header.alg in usertokens.HMAC_ALGORITHMS:
            if not cfg.jwt_secret:
                raise InvalidUserToken(
                    f"{header.alg} tokens need the project's shared jwtSecret, and none is set "
                    "(an HMAC token signed with a public key is refused)."
                )
            key = cfg.jwt_secret.encode()
        else:
            if not cfg.jwks_uri:
                raise InvalidUserToken(f"{header.alg} tokens need the project's jwksUri, and none is set.")
            key = await self.jwks.key(cfg.jwks_uri, header.kid, header.alg)
        return usertokens.verify(
            token,
            key,
            algorithm=header.alg,
            issuers=list(cfg.jwt_allowed_issuers),
            audiences=list(cfg.jwt_expected_audiences),
        )

    async def identity(
        self,
        access: ProjectAccess,
        *,
        user_token: str | None,
        auth_uid: str | None,
        session_checked_in_sql: bool = False,
    ) -> Identity:
        """The request's identity: a verified end-user token wins; `authUid` may not contradict it.

        A key created with requireUserAuth must carry a token. Without one, an API key holder is
        a trusted server and may name any end user with `authUid`. Callers that run the Identity
        through sql.begin_script pass `session_checked_in_sql=True`: an own token's session is
        then checked inside the request's transaction instead of by a control-plane query here.
        """
        if access.project.cluster_id != "default":
            # fluxbase_guard.check_user_session reads the control plane's session tables, which
            # are not in a registered cluster's database (services.clusters): an own token's
            # session is checked here instead, on the control plane, uncached, on every request
            # (as API keys are there), so a logout or a disabled user stops the next request.
            session_checked_in_sql = False
        if user_token:
            claims = await self.claims(
                access.project.id, user_token, session_checked_later=session_checked_in_sql
            )
            if auth_uid is not None and auth_uid != claims["sub"]:
                raise ValidationError("authUid cannot override the identity of the end-user token.")
            own = session_checked_in_sql and claims.get("iss") == usertokens.OWN_ISSUER
            session = (claims["sid"], access.project.id) if own else None
            return end_user_identity(access.sql_scope, claims, session)
        require_end_user_token(access, user_token)
        return key_identity(access, auth_uid)
