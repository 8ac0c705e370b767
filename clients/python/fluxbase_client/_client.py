"""The async client: one httpx connection pool, the credential, the end user's session, retries."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import httpx

from fluxbase_client._encode import to_json
from fluxbase_client._models import AuthListener, Session, SqlResult
from fluxbase_client.auth import Auth
from fluxbase_client.errors import ConnectionFailed, error_for
from fluxbase_client.realtime import Realtime
from fluxbase_client.storage import Storage

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class AsyncFluxbase:
    """Fluxbase over HTTP for one project: `sql`, `batch`, `table`, `storage`, `auth`, `realtime`."""

    def __init__(
        self,
        url: str,
        project_id: str,
        api_key: str | None = None,
        *,
        realtime_url: str | None = None,
        max_retries: int = 3,
        timeout: float = 30.0,
        refresh_margin_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.project_id = project_id
        self.api_key = api_key
        self.realtime_url = realtime_url
        self.max_retries = max_retries
        self.refresh_margin_s = refresh_margin_s
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        self.session: Session | None = None
        self._auth_listeners: list[AuthListener] = []
        self._refresh_lock = asyncio.Lock()
        self.auth = Auth(self)
        self.storage = Storage(self)

    async def __aenter__(self) -> AsyncFluxbase:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- requests -------------------------------------------------------------------------------

    async def _headers(self, with_user: bool) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        if with_user and self.session is not None:
            token = await self.auth.access_token()
            if token:
                h["X-Fluxbase-User-Token"] = token
        return h

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        with_user: bool = True,
        content: Any = None,
        allow_sql_error: bool = False,
    ) -> Any:
        """Send one call; retry 429 (the server did nothing) after Retry-After, 503 and connection
        failures with backoff only when the call is idempotent. Returns the decoded JSON body."""
        safe = method in IDEMPOTENT if idempotent is None else idempotent
        attempt = 0
        while True:
            h = await self._headers(with_user)
            h.update(headers or {})
            try:
                resp = await self.http.request(
                    method,
                    path,
                    json=to_json(json_body) if json_body is not None else None,
                    params={k: v for k, v in (params or {}).items() if v is not None},
                    headers=h,
                    content=content,
                )
            except httpx.ConnectError as exc:
                # Nothing was sent: safe to retry whatever the method.
                if attempt < self.max_retries and content is None:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise ConnectionFailed(0, "CONNECTION_FAILED", str(exc) or "connection failed") from exc
            except httpx.TransportError as exc:
                if safe and attempt < self.max_retries and content is None:
                    attempt += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise ConnectionFailed(0, "CONNECTION_FAILED", str(exc) or "connection failed") from exc
            retry_after = _retry_after(resp)
            if resp.status_code == 429 and attempt < self.max_retries and content is None:
                attempt += 1
                await asyncio.sleep(retry_after if retry_after is not None else _backoff(attempt))
                continue
            if resp.status_code == 503 and safe and attempt < self.max_retries and content is None:
                attempt += 1
                await asyncio.sleep(max(retry_after or 0.0, _backoff(attempt)))
                continue
            try:
                body = resp.json()
            except ValueError:
                body = None
            if resp.status_code >= 400 or (
                isinstance(body, dict) and body.get("success") is False and not allow_sql_error
            ):
                raise error_for(resp.status_code, body, retry_after)
            return body

    # -- SQL ------------------------------------------------------------------------------------

    async def sql(
        self, query: str, params: Iterable[Any] | None = None, *, auth_uid: str | None = None
    ) -> SqlResult:
        """Run one statement; values come back as docs/sql.md maps them (big ints and numerics
        as exact strings). A SQL error raises SqlError with the SQLSTATE in `details`."""
        body: dict[str, Any] = {"projectId": self.project_id, "query": query}
        if params is not None:
            body["params"] = list(params)
        if auth_uid is not None:
            body["authUid"] = auth_uid
        out = await self.request("POST", "/api/execute-sql", json_body=body, idempotent=False)
        return SqlResult.of(out["result"], out.get("executionInfo"))

    async def batch(
        self,
        statements: Iterable[str | tuple[str, Iterable[Any]] | Mapping[str, Any]],
        *,
        read_only: bool = False,
        isolation_level: str | None = None,
        auth_uid: str | None = None,
    ) -> list[SqlResult]:
        """Several statements in one transaction, all or nothing. On failure SqlError carries the
        failing statement's `statement_index`."""
        stmts: list[dict[str, Any]] = []
        for s in statements:
            if isinstance(s, str):
                stmts.append({"query": s})
            elif isinstance(s, tuple):
                stmts.append({"query": s[0], "params": list(s[1])})
            else:
                stmts.append(dict(s))
        body: dict[str, Any] = {"projectId": self.project_id, "statements": stmts}
        if read_only:
            body["readOnly"] = True
        if isolation_level:
            body["isolationLevel"] = isolation_level
        if auth_uid is not None:
            body["authUid"] = auth_uid
        out = await self.request("POST", "/api/execute-batch", json_body=body, idempotent=False)
        return [SqlResult.of(r.get("result", r), r.get("executionInfo")) for r in out["results"]]

    transaction = batch

    def table(self, name: str) -> Query:
        """A records query builder over /api/projects/{id}/tables/{name}/records."""
        return Query(self, name)

    from_ = table

    # -- realtime -------------------------------------------------------------------------------

    async def realtime_token(
        self, *, auth_uid: str | None = None, expires_in: int | None = None
    ) -> dict[str, Any]:
        """Mint a short-lived realtime token (for a browser) with this client's key."""
        body: dict[str, Any] = {"projectId": self.project_id}
        if auth_uid is not None:
            body["authUid"] = auth_uid
        if expires_in is not None:
            body["expiresIn"] = expires_in
        return dict(await self.request("POST", "/api/realtime/token", json_body=body, idempotent=False))

    async def broadcast(self, event: str, payload: Any = None) -> int:
        """Send a broadcast to every subscriber of the project (over HTTP)."""
        body = {"projectId": self.project_id, "event": event, "payload": payload}
        out = await self.request("POST", "/api/realtime/broadcast", json_body=body, idempotent=False)
        return int(out["id"])

    def realtime(
        self,
        *,
        token: str | Callable[[], Awaitable[str]] | None = None,
        url: str | None = None,
        **options: Any,
    ) -> Realtime:
        """A realtime connection (not yet open). The credential is `token` (a string or an async
        function called at every connect), else the end user's access token, else the API key."""
        ws_url = url or self.realtime_url or os.environ.get("FLUXBASE_REALTIME_URL")
        if not ws_url:
            raise ValueError("realtime_url is not set")

        async def credential() -> str:
            if callable(token):
                return await token()
            if token:
                return token
            if self.session is not None:
                return await self.auth.access_token() or ""
            return self.api_key or ""

        return Realtime(ws_url, self.project_id, credential, **options)


class Query:
    """A small query builder over the records REST: filters, sort, paging, fields."""

    def __init__(self, client: AsyncFluxbase, table: str):
        self.client = client
        self.name = table
        self._filter: dict[str, Any] = {}
        self._sort: list[str] = []
        self._fields: list[str] | None = None
        self._limit: int | None = None
        self._offset: int | None = None

    @property
    def _path(self) -> str:
        return f"/api/projects/{self.client.project_id}/tables/{self.name}/records"

    def _op(self, column: str, op: str, value: Any) -> Query:
        cond = self._filter.setdefault(column, {})
        if not isinstance(cond, dict):
            self._filter[column] = cond = {"$eq": cond}
        cond[op] = value
        return self

    def eq(self, column: str, value: Any) -> Query:
        return self._op(column, "$eq", value)

    def neq(self, column: str, value: Any) -> Query:
        return self._op(column, "$ne", value)

    def gt(self, column: str, value: Any) -> Query:
        return self._op(column, "$gt", value)

    def gte(self, column: str, value: Any) -> Query:
        return self._op(column, "$gte", value)

    def lt(self, column: str, value: Any) -> Query:
        return self._op(column, "$lt", value)

    def lte(self, column: str, value: Any) -> Query:
        return self._op(column, "$lte", value)

    def in_(self, column: str, values: Iterable[Any]) -> Query:
        return self._op(column, "$in", list(values))

    def like(self, column: str, pattern: str) -> Query:
        return self._op(column, "$like", pattern)

    def ilike(self, column: str, pattern: str) -> Query:
        return self._op(column, "$ilike", pattern)

    def is_null(self, column: str, null: bool = True) -> Query:
        return self._op(column, "$null", null)

    def where(self, conditions: Mapping[str, Any]) -> Query:
        """Merge a raw filter object (`$and`, `$or`, ...)."""
        self._filter.update(conditions)
        return self

    def order(self, column: str, *, desc: bool = False) -> Query:
        self._sort.append(("-" if desc else "") + column)
        return self

    def select(self, *fields: str) -> Query:
        self._fields = list(fields)
        return self

    def limit(self, n: int) -> Query:
        self._limit = n
        return self

    def offset(self, n: int) -> Query:
        self._offset = n
        return self

    def range(self, start: int, end: int) -> Query:
        """Rows start..end inclusive (offset and limit)."""
        return self.offset(start).limit(end - start + 1)

    def _params(self) -> dict[str, Any]:
        return {
            "filter": json.dumps(to_json(self._filter)) if self._filter else None,
            "sort": ",".join(self._sort) or None,
            "fields": ",".join(self._fields) if self._fields else None,
            "limit": self._limit,
            "offset": self._offset,
        }

    async def page(self) -> dict[str, Any]:
        """The whole answer: records, count, limit, offset, hasMore."""
        return dict(await self.client.request("GET", self._path, params=self._params()))

    async def get(self) -> list[dict[str, Any]]:
        return list((await self.page())["records"])

    async def all(self, page_size: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Every matching record, page after page."""
        offset = self._offset or 0
        while True:
            self._offset, self._limit = offset, page_size
            page = await self.page()
            for r in page["records"]:
                yield r
            if not page.get("hasMore"):
                return
            offset += len(page["records"])

    async def get_one(self, key: Any) -> dict[str, Any]:
        out = await self.client.request("GET", f"{self._path}/{key}")
        return dict(out["record"])

    async def insert(self, values: Mapping[str, Any] | list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = await self.client.request("POST", self._path, json_body=values, idempotent=False)
        return list(out["records"])

    async def update(self, key: Any, values: Mapping[str, Any]) -> dict[str, Any]:
        out = await self.client.request("PATCH", f"{self._path}/{key}", json_body=values, idempotent=True)
        return dict(out["record"])

    async def delete(self, key: Any) -> dict[str, Any]:
        return dict(await self.client.request("DELETE", f"{self._path}/{key}", idempotent=False))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return None


def _backoff(attempt: int, base: float = 0.25, cap: float = 8.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))
