"""The realtime WebSocket service (the `websockets` library): the reference doc's protocol.

Client → server: `{"type": "subscribe", "roomId": "project_<id>", "token"?, "since"?, "tables"?,
"operations"?}`, `{"type": "unsubscribe", "roomId"}`, `{"type": "broadcast", "roomId", "event",
"payload"}`, `{"type": "ping"}`. A credential (project API key or realtime token) comes as
`token` in the subscribe message or `?token=` on the URL. Server → client: `subscribed`,
`db_event`, `schema_update`, `broadcast`, `resync_required`, `error`, `pong`.

A subscriber identified as an end user (a realtime token with `authUid`, or a credential an
`EndUserVerifier` accepts) only receives what the project's RLS policies let it see (`rls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from websockets.asyncio.server import Request, Response, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.db.control import check_runtime_role
from fluxbase.errors import (
    AuthRequired,
    FluxbaseError,
    ProjectNotFound,
    ProjectSuspended,
    ScopeMismatch,
    UserTokenRequired,
    ValidationError,
)
from fluxbase.security import apikeys, tokens
from fluxbase.services import realtime
from fluxbase.services.access import authenticate_key
from fluxbase.services.identity import IdentityResolver
from fluxbase.services.realtime import Cursor
from fluxbase.storage.s3 import ObjectStore
from fluxbase_realtime.hub import Client, Hub, Subscription
from fluxbase_realtime.outbox import OutboxEvent, OutboxReader, read_replay
from fluxbase_realtime.rls import EndUserVerifier, RlsGate, Viewer, resolver_verifier

log = logging.getLogger("fluxbase.realtime")

ROOM_PREFIX = "project_"
OPERATIONS = {"INSERT", "UPDATE", "DELETE", "SCHEMA"}


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows on one project."""

    project_id: str
    scope: str
    viewer: Viewer | None  # an end user: RLS-filtered delivery


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(code: str, message: str, room: str | None = None) -> bytes:
    body: dict[str, Any] = {"type": "error", "error": {"code": code, "message": message}}
    if room:
        body["roomId"] = room
    return _dumps(body)


class RealtimeService:
    """Process-wide state of the realtime service: pool, outbox reader, hub."""

    def __init__(self, settings: Settings, end_user_verifier: EndUserVerifier | None = None):
        self.settings = settings
        self.end_user_verifier = end_user_verifier
        self.gate: RlsGate | None = None
        self.db: asyncpg.Pool | None = None
        self.store = ObjectStore(settings.s3)
        self.hub = Hub()
        self.queue_size = settings.realtime.queue_size
        # A batch never exceeds half a socket queue, so a consumer that keeps up is never cut off
        # by one burst; writers drain between batches while the reader waits on PostgreSQL.
        self.reader = OutboxReader(
            settings.database.url, self.hub.dispatch, batch=max(1, min(2000, self.queue_size // 2))
        )
        self._stop = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self.clients: set[Client] = set()

    async def start(self) -> None:
        self.db = await asyncpg.create_pool(self.settings.database.url, min_size=0, max_size=8)
        await check_runtime_role(self.db, self.settings)
        if self.end_user_verifier is None:
            self.end_user_verifier = resolver_verifier(IdentityResolver(self.db, self.settings))
        self.gate = self.hub.gate = RlsGate(self.settings, self.db)
        await self.store.start()
        self._reader_task = asyncio.create_task(self.reader.run(self._stop))
        self._ping_task = asyncio.create_task(self._keepalive(self.settings.realtime.ping_interval_s))

    async def _keepalive(self, every_s: float) -> None:
        """One ping loop for all sockets (instead of a keepalive task per connection) keeps idle
        connections open through proxies at a lower memory cost per subscriber."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)
            for client in list(self.clients):
                with contextlib.suppress(ConnectionClosed, RuntimeError):
                    await client.ws.ping()
            await self._drop_suspended()

    async def _drop_suspended(self) -> None:
        """End the subscriptions of projects suspended since they were granted (each ping round)."""
        if not self.hub.rooms or self.db is None:
            return
        try:
            rows = await self.db.fetch(
                "SELECT id FROM fluxbase.projects WHERE id = ANY($1::text[]) AND status = 'suspended'",
                list(self.hub.rooms),
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not check for suspended projects: %r", exc)
            return
        for row in rows:
            for sub, client in list(self.hub.rooms.get(row["id"], {}).items()):
                self.hub.leave(sub)
                room = ROOM_PREFIX + sub.project_id
                client.subs.pop(room, None)
                client.push(_error("PROJECT_SUSPENDED", "Project is suspended.", room))

    async def close(self) -> None:
        self._stop.set()
        if self._ping_task is not None:
            self._ping_task.cancel()
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader_task, 5)
        await self.reader.close()
        if self.gate is not None:
            await self.gate.close()
        if self.db is not None:
            await self.db.close()
        await self.store.close()

    async def ready(self) -> dict[str, str]:
        async def pg() -> bool:
            try:
                assert self.db is not None
                return await asyncio.wait_for(self.db.fetchval("SELECT 1"), 2) == 1
            except Exception:
                return False

        async def s3() -> bool:
            try:
                return await asyncio.wait_for(self.store.ping(), 3)
            except Exception:
                return False

        pg_ok, s3_ok = await asyncio.gather(pg(), s3())
        return {
            "postgres": "ok" if pg_ok else "down",
            "s3": "ok" if s3_ok else "down",
            "outbox": "ok" if self.reader.ready.is_set() else "starting",
        }

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/live":
            return _json(connection, HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            checks = await self.ready()
            ok = all(v == "ok" for v in checks.values())
            return _json(
                connection,
                HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "ok" if ok else "unavailable", "checks": checks},
            )
        return None

    # -- authentication ---------------------------------------------------------------------

    async def _grant(self, token: str | None, project_id: str, origin: str | None) -> Grant:
        if not ids.valid_project_id(project_id):
            raise ProjectNotFound()
        if not token:
            raise AuthRequired("A credential is required: a project API key or a realtime token.")
        assert self.db is not None
        if apikeys.looks_like_key(token):
            auth = await authenticate_key(self.db, token, origin)
            if auth.project.id != project_id:
                raise ScopeMismatch("This API key does not have access to this project.")
            if auth.project.status == "suspended":
                raise ProjectSuspended()
            assert auth.principal.key is not None
            if auth.principal.key.require_user_auth:
                # A browser-side key: it may only subscribe through a token naming its end user.
                raise UserTokenRequired(
                    "This API key requires an end-user identity: mint a realtime token with "
                    "POST /api/realtime/token and X-Fluxbase-User-Token."
                )
            return Grant(project_id, auth.principal.key.scope, None)
        try:
            claims = tokens.verify(self.settings.auth.secret_key, token, kind=realtime.TOKEN_KIND)
        except AuthRequired:
            if self.end_user_verifier is None:
                raise
            return await self._end_user_grant(token, project_id)
        if claims.subject != project_id:
            raise ScopeMismatch("This realtime token is for another project.")
        status = await self.db.fetchval("SELECT status FROM fluxbase.projects WHERE id = $1", project_id)
        if status is None:
            raise ProjectNotFound()
        member = claims.extra.get("memberId")
        if member is not None and not await self.db.fetchval(
            "SELECT 1 FROM fluxbase.project_members WHERE project_id = $1 AND user_id = $2",
            project_id,
            member,
        ):
            raise ScopeMismatch("The member who minted this token no longer belongs to the project.")
        if status == "suspended":
            raise ProjectSuspended()
        scope = str(claims.extra.get("scope", "read"))
        uid = claims.extra.get("authUid")
        viewer = None
        if isinstance(uid, str) and uid:
            # The same identity /api/execute-sql gives a request with this scope and authUid.
            viewer = Viewer.of(uid, {"role": scope, "project_id": project_id, "sub": uid}, scope)
        return Grant(project_id, scope, viewer)

    async def _end_user_grant(self, token: str, project_id: str) -> Grant:
        assert self.end_user_verifier is not None and self.db is not None
        user = await self.end_user_verifier(token, project_id)
        if user is None:
            raise AuthRequired("Invalid or malformed token.")
        if user.project_id != project_id:
            raise ScopeMismatch("This end-user token is for another project.")
        status = await self.db.fetchval("SELECT status FROM fluxbase.projects WHERE id = $1", project_id)
        if status is None:
            raise ProjectNotFound()
        if status == "suspended":
            raise ProjectSuspended()
        role = str(user.claims.get("role") or "authenticated")
        return Grant(project_id, "read", Viewer.of(user.auth_uid, user.claims, role))

    # -- protocol ---------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request else {}
        url_token: str | None = (query.get("token") or [None])[0]  # type: ignore[list-item]
        origin = ws.request.headers.get("Origin") if ws.request else None
        client = Client(ws, self.queue_size)
        self.clients.add(client)
        grants: dict[str, Grant] = {}
        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    if not isinstance(msg, dict):
                        raise ValueError
                except ValueError:
                    client.push(_error("VALIDATION_ERROR", "Messages must be JSON objects."))
                    continue
                kind = msg.get("type")
                room = msg.get("roomId")
                try:
                    if kind == "subscribe":
                        await self._subscribe(client, grants, msg, url_token, origin)
                    elif kind == "unsubscribe":
                        sub = client.subs.pop(str(room), None)
                        if sub is not None:
                            self.hub.leave(sub)
                            grants.pop(str(room), None)
                        client.push(_dumps({"type": "unsubscribed", "roomId": room}))
                    elif kind == "broadcast":
                        grant = grants.get(str(room))
                        if grant is None or str(room) not in client.subs:
                            client.push(
                                _error("AUTH_REQUIRED", "Subscribe to the room before broadcasting.", room)
                            )
                            continue
                        assert self.db is not None
                        await realtime.broadcast(
                            self.db, grant.project_id, msg.get("event"), msg.get("payload")
                        )
                    elif kind == "ping":
                        client.push(_dumps({"type": "pong"}))
                    else:
                        client.push(_error("VALIDATION_ERROR", f"Unknown message type {kind!r}.", room))
                except FluxbaseError as exc:
                    client.push(_error(exc.code, exc.message, room if isinstance(room, str) else None))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("database error in realtime handler: %r", exc)
                    client.push(_error("DATABASE_CONNECTION_ERROR", "Transient database error; retry.", room))
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)
            for sub in client.subs.values():
                self.hub.leave(sub)
            await client.stop()

    async def _subscribe(
        self,
        client: Client,
        grants: dict[str, Grant],
        msg: dict[str, Any],
        url_token: str | None,
        origin: str | None,
    ) -> None:
        room = msg.get("roomId")
        if not isinstance(room, str) or not room.startswith(ROOM_PREFIX):
            raise ValidationError("roomId must look like project_<projectId>.")
        project_id = room[len(ROOM_PREFIX) :]
        grant = await self._grant(msg.get("token") or url_token, project_id, origin)
        tables = msg.get("tables")
        operations = msg.get("operations")
        if tables is not None and not (isinstance(tables, list) and all(isinstance(t, str) for t in tables)):
            raise ValidationError("tables must be a list of table names.")
        if operations is not None:
            if not (isinstance(operations, list) and all(isinstance(o, str) for o in operations)):
                raise ValidationError("operations must be a list.")
            operations = [o.upper() for o in operations]
            if not set(operations) <= OPERATIONS:
                raise ValidationError(f"operations must be among {sorted(OPERATIONS)}.")
        since = msg.get("since")
        old = client.subs.pop(room, None)
        if old is not None:
            self.hub.leave(old)
        sub = Subscription(
            project_id,
            frozenset(tables) if tables is not None else None,
            frozenset(operations) if operations is not None else None,
            viewer=grant.viewer,
        )
        await self.reader.ready.wait()
        upto = self.reader.cursor
        assert upto is not None
        if since is not None:
            start = realtime.parse_cursor(since)
            sub.held = []
        client.subs[room] = sub
        grants[room] = grant
        self.hub.join(client, sub)
        client.push(_dumps({"type": "subscribed", "roomId": room, "cursor": str(upto)}))
        if since is not None:
            await self._replay(client, sub, room, start, upto)

    async def _replay(
        self, client: Client, sub: Subscription, room: str, since: Cursor, upto: Cursor
    ) -> None:
        assert self.db is not None
        try:
            row = await self.db.fetchrow(
                "SELECT trimmed_to_xid::text AS x, trimmed_to_id AS i FROM fluxbase.event_retention"
            )
            if row is not None and (since.xid, since.id) < (int(row["x"]), row["i"]):
                client.push(
                    _dumps(
                        {
                            "type": "resync_required",
                            "roomId": room,
                            "message": "The requested cursor is older than the event retention.",
                            "cursor": str(upto),
                        }
                    )
                )
                return
            after = since
            while not client.closed:
                events = await read_replay(self.db, sub.project_id, after, upto, 1000)
                for message in await self.hub.visible(sub, events):
                    client.push(message)
                if len(events) < 1000:
                    break
                after = events[-1].cursor
        finally:
            # Events that arrived during the replay are held until here, then sent in order; the
            # loop ends once no more arrive while the gate decides on the previous ones.
            while sub.held:
                held: list[OutboxEvent] = [
                    ev for ev in sub.held if (ev.cursor.xid, ev.cursor.id) > (upto.xid, upto.id)
                ]
                sub.held = [] if sub.viewer is not None else None
                for message in await self.hub.visible(sub, held):
                    client.push(message)
            sub.held = None


def _json(connection: ServerConnection, status: HTTPStatus, body: dict[str, object]) -> Response:
    response = connection.respond(status, json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    return response


async def serve(
    settings: Settings, host: str, port: int, end_user_verifier: EndUserVerifier | None = None
) -> None:
    """Run the service until SIGINT/SIGTERM; `end_user_verifier` admits end-user credentials."""
    service = RealtimeService(settings, end_user_verifier)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with ws_serve(
            service.handler,
            host,
            port,
            process_request=service.process_request,
            ping_interval=None,  # one service-wide ping loop instead (RealtimeService._keepalive)
            max_size=1 << 20,
            max_queue=16,
        ):
            log.info("realtime listening on ws://%s:%s", host, port)
            await stop.wait()
    finally:
        await service.close()
