"""The realtime WebSocket service (the `websockets` library): the reference doc's protocol.

Client → server: `{"type": "subscribe", "roomId": "project_<id>", "token"?, "since"?, "tables"?,
"operations"?, "filters"?}`, `{"type": "unsubscribe", "roomId"}`, `{"type": "broadcast", "roomId",
"event", "payload"}`, `{"type": "track", "roomId", "payload"}`, `{"type": "untrack", "roomId"}`,
`{"type": "ping"}`. A credential (project API key or realtime token) comes as `token` in the
subscribe message or `?token=` on the URL. Server → client: `subscribed`, `db_event`,
`schema_update`, `broadcast`, `resync_required`, `error`, `pong`, `tracked`, `untracked`,
`presence_state`, `presence_diff`.

Rooms: the project room `project_<id>` (row, schema and project broadcast events; `filters`
narrows row events per table, fluxbase_realtime.filters) and topics `project_<id>:<topic>`
(broadcasts to the topic and presence, fluxbase_realtime.presence). Who may join a topic, send
to it and track presence in it is the project's `topics` setting (admin keys always may).

A subscriber receives only rows its credential could SELECT with SQL (`rls`): read and readwrite
keys (and tokens they mint) as their role with the anonymous identity, end users (a realtime
token with `authUid`, or a credential an `EndUserVerifier` accepts) by RLS as that user; admin
keys receive everything. Broadcasting needs scope readwrite or admin, as over HTTP, and is
rate-limited per key. Every few seconds each live subscription's credential is checked again
(`credentials`); a subscription whose credential no longer holds ends with an `error` message
that names the room and why (`AUTH_REQUIRED`, `PROJECT_SUSPENDED`, `SCOPE_MISMATCH`,
`INVALID_USER_TOKEN`, `USER_DISABLED`, ...), and nothing of the room reaches the socket after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from websockets.asyncio.server import Request, Response, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from fluxbase import ids, metrics, tracing
from fluxbase.config import Settings
from fluxbase.db.control import check_runtime_role
from fluxbase.db.doorbell import ControlBell, wait_any
from fluxbase.errors import (
    AuthRequired,
    FluxbaseError,
    InsufficientPermissions,
    ProjectNotFound,
    ProjectSuspended,
    ScopeMismatch,
    UserTokenRequired,
    ValidationError,
)
from fluxbase.ratelimit import SharedRateLimiter
from fluxbase.security import apikeys, tokens, usertokens
from fluxbase.security.roles import role_name
from fluxbase.services import realtime
from fluxbase.services.access import authenticate_key, load_project
from fluxbase.services.identity import IdentityResolver, end_user_identity
from fluxbase.services.realtime import Cursor
from fluxbase_realtime import credentials
from fluxbase_realtime import filters as row_filters
from fluxbase_realtime.clusters import ClusterReaders
from fluxbase_realtime.credentials import Credential, Grant
from fluxbase_realtime.hub import CUT_OFF, DEFAULT_MAX_BYTES, Backlogs, Client, Hub, Subscription
from fluxbase_realtime.outbox import OutboxEvent, OutboxReader, read_replay
from fluxbase_realtime.presence import Presence, Watcher
from fluxbase_realtime.rls import EndUserVerifier, RlsGate, Viewer, resolver_verifier

log = logging.getLogger("fluxbase.realtime")

ROOM_PREFIX = "project_"
OPERATIONS = {"INSERT", "UPDATE", "DELETE", "SCHEMA"}
WRITE_SCOPES = frozenset({"readwrite", "admin"})
MAX_ROOMS_PER_SOCKET = 100
TOPIC_RULES_TTL_S = 2.0

CONNECTIONS = metrics.REGISTRY.gauge("fluxbase_realtime_connections", "Open realtime sockets.")
SUBSCRIPTIONS = metrics.REGISTRY.gauge("fluxbase_realtime_subscriptions", "Subscriptions of open sockets.")
DELIVERED = metrics.REGISTRY.counter(
    "fluxbase_realtime_delivered_messages_total", "Change messages queued to subscribers."
)


def parse_room(room: Any) -> tuple[str, str | None]:
    """`project_<id>` → (id, None); `project_<id>:<topic>` → (id, topic); else ValidationError."""
    if not isinstance(room, str) or not room.startswith(ROOM_PREFIX) or len(room) > 200:
        raise ValidationError("roomId must look like project_<projectId> or project_<projectId>:<topic>.")
    project_id, sep, topic = room[len(ROOM_PREFIX) :].partition(":")
    if not sep:
        return project_id, None
    return project_id, realtime.check_topic(topic)


def viewer_for(
    project_id: str, scope: str, uid: str | None, claims: dict[str, Any] | None = None
) -> Viewer | None:
    """How the gate sees a subscriber: None for an admin without an end user (everything); else
    the SQL role it is checked as and its identity, as /api/execute-sql would set them."""
    if scope == "admin" and not uid:
        return None
    # An admin-minted token naming an end user is meant for that user's browser: it is checked
    # as the read role for that user, never with the admin role's ownership of the tables.
    role_scope = scope if scope in ("read", "readwrite") else "read"
    if claims is None:
        claims = {"role": scope, "project_id": project_id}  # as SQL's auth.jwt() for a key
        if uid:
            claims["sub"] = uid
    return Viewer.of(uid or "", claims, scope, role_scope)


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
        self.hub = Hub()
        self.queue_size = settings.realtime.queue_size
        # Bytes a socket may hold unsent; a class's batch reaches a socket in parts of at most
        # half of it, each taken as the socket drains (hub.Client).
        self.max_bytes = settings.realtime.max_buffered_bytes
        self.hub.part_bytes = max(1, self.max_bytes // 2)
        self.stall_s = settings.realtime.stall_s  # a part that waits this long cuts its socket off
        # Parts waiting in backlogs, service-wide (FLUXBASE_REALTIME_MAX_BACKLOG_BYTES): past it
        # the socket holding the most backlog is closed (hub.Backlogs).
        self.backlogs = Backlogs(settings.realtime.max_backlog_bytes)
        # A batch never exceeds half a socket queue, so a consumer that keeps up is never cut off
        # by one burst; writers drain between batches while the reader waits on PostgreSQL.
        batch = max(1, min(2000, self.queue_size // 2))
        self.reader = OutboxReader(settings.database.url, self._deliver, batch=batch)
        # One more reader per registered database cluster (fluxbase_realtime.clusters).
        self.clusters = ClusterReaders(settings, self.reader, self._deliver, batch)
        self._clusters_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self.clients: set[Client] = set()
        # Shared with the API replicas: a key's broadcasts and requests count against one limit.
        self.limiter: SharedRateLimiter | None = None
        self._revalidate_task: asyncio.Task[None] | None = None
        self.bell: ControlBell | None = None
        self._bell_task: asyncio.Task[None] | None = None
        self.presence: Presence | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._topic_rules: dict[str, tuple[float, list[dict[str, Any]] | None]] = {}
        self._unregister = metrics.REGISTRY.on_scrape(self._collect)

    def _collect(self) -> None:
        CONNECTIONS.set(value=len(self.clients))
        SUBSCRIPTIONS.set(value=sum(len(room) for room in self.hub.rooms.values()))
        DELIVERED.values[()] = float(self.hub.delivered)
        metrics.OUTBOX_LAG.set("realtime", value=self.reader.lag_s())

    async def start(self) -> None:
        self.db = await asyncpg.create_pool(self.settings.database.url, min_size=0, max_size=8)
        await check_runtime_role(self.db, self.settings)
        self.limiter = SharedRateLimiter(self.db)
        if self.end_user_verifier is None:
            self.end_user_verifier = resolver_verifier(IdentityResolver(self.db, self.settings))
        self.gate = self.hub.gate = RlsGate(self.settings, self.db)
        self._reader_task = asyncio.create_task(self.reader.run(self._stop))
        self._clusters_task = asyncio.create_task(self.clusters.watch(self.db, self._stop))
        self._ping_task = asyncio.create_task(self._keepalive(self.settings.realtime.ping_interval_s))
        self.bell = ControlBell(self.settings.database.url, "fluxbase-realtime-control")
        self._bell_task = asyncio.create_task(self.bell.run(self._stop))
        self._revalidate_task = asyncio.create_task(self._revalidate(self.settings.realtime.revalidate_s))
        rt = self.settings.realtime
        self.presence = Presence(
            self.settings.database.url,
            self.db,
            heartbeat_s=rt.presence_heartbeat_s,
            max_members=rt.presence_max_members,
            max_state_bytes=rt.presence_max_state_bytes,
        )
        self._presence_task = asyncio.create_task(self.presence.run(self._stop, _abort))

    async def _deliver(self, events: list[OutboxEvent]) -> None:
        # The whole batch is handed to the hub at once: each socket takes it at its own pace
        # (hub.Client's backlog, in parts of at most half the per-socket byte bound), so a socket
        # that reads slowly or not at all delays nobody else's events; it is cut off (4008) once
        # a part has waited FLUXBASE_REALTIME_STALL_SECONDS without fitting under its bound.
        if tracing.enabled():
            before = self.hub.delivered
            with tracing.span(
                "realtime deliver", "consumer", {"messaging.batch.message_count": len(events)}
            ) as span:
                await self.hub.dispatch(events)
                span.set_attribute("fluxbase.realtime.deliveries", self.hub.delivered - before)
        else:
            await self.hub.dispatch(events)
        # While events keep coming, the reader polls again after a pause that grows with the
        # number of sockets (5 ms up to 25 ms at 1 250 and more): with many sockets, each write
        # carries several commits' events instead of one write per commit and socket.
        self.reader.busy_poll_s = min(0.025, max(0.005, len(self.clients) * 0.00002))

    async def _keepalive(self, every_s: float) -> None:
        """One ping loop for all sockets (instead of a keepalive task per connection) keeps idle
        connections open through proxies at a lower memory cost per subscriber."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)
            for client in list(self.clients):
                with contextlib.suppress(ConnectionClosed, RuntimeError):
                    await client.ws.ping()

    async def _revalidate(self, every_s: float) -> None:
        """Check every live subscription's credential again, every `every_s` seconds, in one
        batched query per kind for all projects (credentials.invalid); end those that no longer
        hold. The state is PostgreSQL's, so every replica ends them within one round; the control
        doorbell (a key revoked, a project suspended, on any replica) starts a round at once."""
        while not self._stop.is_set():
            if self.bell is None:
                await wait_any(self._stop, at_most_s=every_s)
            else:
                await wait_any(self._stop, self.bell.rang, at_most_s=every_s)
                self.bell.rang.clear()
            try:
                await self.revalidate_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not re-validate realtime credentials: %r", exc)
            except Exception:
                # Revocation depends on this loop: whatever went wrong, log it and go on.
                log.exception("realtime credential re-validation failed")

    async def revalidate_once(self) -> int:
        """One re-validation round; returns the number of subscriptions ended."""
        if self.db is None:
            return 0
        live = [(sub, client) for room in list(self.hub.rooms.values()) for sub, client in list(room.items())]
        try:
            # A cluster whose connection string changed: its reader reconnects with the new one.
            await self.clusters.refresh(self.db)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as failure:
            log.warning("could not refresh the database clusters: %r", failure)
        try:
            await self._resync_moved(live)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as failure:
            # Revocation below must not wait on this: log it, the next round tries again.
            log.warning("could not check for moved projects: %r", failure)
        creds = {sub.grant.credential for sub, _ in live if sub.grant is not None}
        bad = await credentials.invalid(self.db, creds)
        ended = 0
        for sub, client in live:
            if sub.grant is None:
                continue
            exc = bad.get(sub.grant.credential)
            # (Skip a subscription that ended or was replaced while the check ran.)
            if exc is not None and self.hub.rooms.get(sub.project_id, {}).get(sub) is client:
                self._end(sub, client, exc)
                ended += 1
        return ended

    async def _resync_moved(self, live: list[tuple[Subscription, Client]]) -> None:
        """Subscribers of a project that moved to another cluster (services.moves) get
        `resync_required`: its events now come from that cluster's outbox, whose cursors are not
        the old one's, so a client re-reads its state and subscribes on with the new cursor."""
        assert self.db is not None
        moved = set(await self.clusters.moved(self.db, {sub.project_id for sub, _ in live}))
        for sub, client in live:
            if sub.project_id not in moved:
                continue
            reader = await self.clusters.reader_for(self.db, sub.project_id)
            cursor = reader.position(sub.project_id) if reader.cursor is not None else None
            client.push(
                _dumps(
                    {
                        "type": "resync_required",
                        "roomId": sub.room or ROOM_PREFIX + sub.project_id,
                        "message": "The project moved to another database cluster: re-read its state.",
                        "cursor": None if cursor is None else str(cursor),
                    }
                )
            )

    def _end(self, sub: Subscription, client: Client, exc: FluxbaseError) -> None:
        room = sub.room or ROOM_PREFIX + sub.project_id
        self._leave(client, sub)
        # The socket stays open (it may hold other rooms, or subscribe again with a valid
        # credential); the reference client would only reconnect with the same credential.
        client.push(_error(exc.code, exc.message, room))

    def _leave(self, client: Client, sub: Subscription) -> None:
        """The socket leaves a room: fan-out, presence watching and its presence member."""
        self.hub.leave(sub)
        if client.subs.get(sub.room) is sub:
            del client.subs[sub.room]
        if sub.topic is not None and self.presence is not None:
            if isinstance(sub.watcher, Watcher):
                self.presence.unwatch(sub.project_id, sub.topic, sub.watcher)
            if (sub.project_id, sub.topic) in self.presence.tracking.get(client, {}):
                task = asyncio.create_task(self.presence.untrack(client, sub.project_id, sub.topic))
                _background.add(task)
                task.add_done_callback(_background.discard)

    async def close(self) -> None:
        self._stop.set()
        for task in (self._ping_task, self._revalidate_task, self._presence_task, self._bell_task):
            if task is not None:
                task.cancel()
        if self.presence is not None:
            await self.presence.close()
        if self._reader_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader_task, 5)
        if self._clusters_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._clusters_task, 5)
        await self.clusters.close()
        await self.reader.close()
        await self.hub.close()
        if self.gate is not None:
            await self.gate.close()
        if self.db is not None:
            await self.db.close()
        self._unregister()

    async def ready(self) -> dict[str, str]:
        """What serving needs: the control database and the outbox reader. Not S3: the realtime
        service never reads or writes an object, so an S3 outage must not take it out of rotation."""
        try:
            assert self.db is not None
            pg_ok = await asyncio.wait_for(self.db.fetchval("SELECT 1"), 2) == 1
        except Exception:
            pg_ok = False
        return {
            "postgres": "ok" if pg_ok else "down",
            "outbox": "ok" if self.reader.ready.is_set() else "starting",
        }

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/live":
            return _json(connection, HTTPStatus.OK, {"status": "ok"})
        if path == "/metrics":
            host = connection.remote_address[0] if connection.remote_address else None
            proxied = any(h in request.headers for h in metrics.PROXY_HEADERS)
            auth = request.headers.get("Authorization")
            if not metrics.allowed(self.settings.metrics_token, auth, host, proxied):
                response = connection.respond(HTTPStatus.UNAUTHORIZED, metrics.DENIED.decode())
                del response.headers["Content-Type"]  # respond() sets text/plain
                response.headers["Content-Type"] = "application/json"
                return response
            response = connection.respond(HTTPStatus.OK, (await metrics.REGISTRY.render()).decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = metrics.CONTENT_TYPE
            response.headers["Cache-Control"] = "no-store"
            return response
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

    def _rate(self, *limits: tuple[int | None, int | None] | None) -> tuple[int, int]:
        """The first configured (requests, window) of key, project; else the tenant default."""
        for lim in limits:
            if lim is not None and lim[0] and lim[1]:
                return int(lim[0]), int(lim[1])
        t = self.settings.tenant
        return t.rate_limit_requests, t.rate_limit_window_s

    async def _grant(self, token: str | None, project_id: str, origin: str | None) -> Grant:
        if not ids.valid_project_id(project_id):
            raise ProjectNotFound()
        if not token:
            raise AuthRequired("A credential is required: a project API key or a realtime token.")
        assert self.db is not None
        if apikeys.looks_like_key(token):
            auth = await authenticate_key(self.db, token, origin)
            if auth.project.id != project_id:
                await load_project(self.db, project_id)  # 404 for an unknown project, as over HTTP
                raise ScopeMismatch("This API key does not have access to this project.")
            if auth.project.status == "suspended":
                raise ProjectSuspended()
            key = auth.principal.key
            assert key is not None
            if key.require_user_auth:
                # A browser-side key: it may only subscribe through a token naming its end user.
                raise UserTokenRequired(
                    "This API key requires an end-user identity: mint a realtime token with "
                    "POST /api/realtime/token and X-Fluxbase-User-Token."
                )
            cred = Credential(
                project_id,
                key.scope,
                key_id=key.id,
                key_fingerprint=realtime.key_fingerprint(auth.key_hash),
                key_direct=True,
            )
            rate = self._rate(key.rate_limit, auth.project.rate_limit)
            return Grant(
                project_id, key.scope, viewer_for(project_id, key.scope, None), cred, f"key:{key.id}", rate
            )
        try:
            claims = tokens.verify(self.settings.auth.secret_key, token, kind=realtime.TOKEN_KIND)
        except AuthRequired:
            if self.end_user_verifier is None:
                raise
            return await self._end_user_grant(token, project_id)
        if claims.subject != project_id:
            await load_project(self.db, project_id)  # 404 for an unknown project, as over HTTP
            raise ScopeMismatch("This realtime token is for another project.")
        x = claims.extra
        scope = str(x.get("scope", "read"))
        uid = x.get("authUid") if isinstance(x.get("authUid"), str) and x.get("authUid") else None
        cred = Credential(
            project_id,
            scope,
            key_id=_str(x.get("keyId")),
            key_fingerprint=_str(x.get("keyFp")),
            member_id=_str(x.get("memberId")),
            session_id=_str(x.get("sessionId")),
            user_id=uid if x.get("userSession") else None,
            user_session=_str(x.get("userSession")),
        )
        # The token dies with what minted it: the same check as the periodic re-validation.
        bad = await credentials.invalid(self.db, [cred])
        if cred in bad:
            raise bad[cred]
        row = await self.db.fetchrow(
            """SELECT p.rate_limit_requests AS p_req, p.rate_limit_window_s AS p_win,
                      k.rate_limit_requests AS k_req, k.rate_limit_window_s AS k_win
               FROM fluxbase.projects p LEFT JOIN fluxbase.api_keys k ON k.id = $2 AND k.project_id = p.id
               WHERE p.id = $1""",
            project_id,
            cred.key_id,
        )
        rate = self._rate(
            (row["k_req"], row["k_win"]) if row else None, (row["p_req"], row["p_win"]) if row else None
        )
        if cred.key_id:
            name = f"key:{cred.key_id}"
        elif cred.member_id:
            name = f"user:{cred.member_id}"
        else:
            name = f"token:{project_id}:{uid or ''}"
        return Grant(project_id, scope, viewer_for(project_id, scope, uid), cred, name, rate)

    async def _end_user_grant(self, token: str, project_id: str) -> Grant:
        assert self.end_user_verifier is not None and self.db is not None
        # Read before the token is verified: a change of the settings after this ends the
        # subscription at the next re-validation round (credentials.invalid).
        settings_at = await self.db.fetchval(
            "SELECT updated_at FROM fluxbase.project_auth_settings WHERE project_id = $1", project_id
        )
        user = await self.end_user_verifier(token, project_id)
        if user is None or not user.auth_uid:
            raise AuthRequired("Invalid or malformed token.")
        if user.project_id != project_id:
            await load_project(self.db, project_id)  # 404 for an unknown project, as over HTTP
            raise ScopeMismatch("This end-user token is for another project.")
        own = user.claims.get("iss") == usertokens.OWN_ISSUER and isinstance(user.claims.get("sid"), str)
        cred = Credential(
            project_id,
            "read",
            user_id=user.auth_uid if own else None,
            user_session=str(user.claims["sid"]) if own else None,
            expires_at=float(exp) if isinstance(exp := user.claims.get("exp"), int | float) else None,
            auth_settings_at=None if own else settings_at,
            external=not own,
        )
        bad = await credentials.invalid(self.db, [cred])
        if cred in bad:
            raise bad[cred]
        row = await self.db.fetchrow(
            "SELECT rate_limit_requests, rate_limit_window_s FROM fluxbase.projects WHERE id = $1", project_id
        )
        rate = self._rate((row["rate_limit_requests"], row["rate_limit_window_s"]) if row else None)
        # auth.role() exactly as SQL sets it for this user behind a read key.
        ident = end_user_identity("read", {**user.claims, "sub": user.auth_uid})
        viewer = Viewer.of(user.auth_uid, ident.claims, ident.role, "read")
        return Grant(project_id, "read", viewer, cred, f"enduser:{project_id}:{user.auth_uid}", rate)

    # -- protocol ---------------------------------------------------------------------------

    def ws_options(self) -> dict[str, Any]:
        """The websockets server options the service runs with (`serve`; tests serve the same)."""
        return {
            "process_request": self.process_request,
            "ping_interval": None,  # one service-wide ping loop instead (RealtimeService._keepalive)
            "max_size": 1 << 20,
            "max_queue": 16,
            # No permessage-deflate: compressing each message once per subscriber costs more CPU
            # than the fan-out itself, and one frame's bytes can then serve every socket (hub).
            "compression": None,
            # A peer that reads nothing is dropped before what it made us write piles up (pongs).
            "create_connection": bounded_connection(self.max_bytes),
        }

    async def handler(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request else {}
        url_token: str | None = (query.get("token") or [None])[0]  # type: ignore[list-item]
        origin = ws.request.headers.get("Origin") if ws.request else None
        client = Client(
            ws, self.queue_size, max_bytes=self.max_bytes, stall_s=self.stall_s, budget=self.backlogs
        )
        self.clients.add(client)
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
                        await self._subscribe(client, msg, url_token, origin)
                    elif kind == "unsubscribe":
                        sub = client.subs.get(str(room))
                        if sub is not None:
                            self._leave(client, sub)
                        client.push(_dumps({"type": "unsubscribed", "roomId": room}))
                    elif kind == "broadcast":
                        await self._broadcast(client, str(room), msg)
                    elif kind == "track":
                        await self._track(client, str(room), msg)
                    elif kind == "untrack":
                        await self._untrack(client, str(room))
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
            for sub in list(client.subs.values()):
                self.hub.leave(sub)
                if sub.topic is not None and isinstance(sub.watcher, Watcher) and self.presence is not None:
                    self.presence.unwatch(sub.project_id, sub.topic, sub.watcher)
            await client.stop()
            if self.presence is not None and client in self.presence.tracking:
                try:
                    await self.presence.untrack_all(client)
                except Exception as exc:
                    # Its rows expire within the heartbeat anyway.
                    log.warning("could not untrack a closed connection's presence: %r", exc)

    async def _broadcast(self, client: Client, room: str, msg: dict[str, Any]) -> None:
        """As POST /api/realtime/broadcast: write scope, the size cap, the key's rate limit; on a
        topic, the project's `send` rule for it instead of the scope."""
        sub = client.subs.get(room)
        if sub is None or sub.grant is None:
            raise AuthRequired("Subscribe to the room before broadcasting.")
        grant = sub.grant
        if sub.topic is not None:
            await self._topic_allows(grant, sub.topic, "send")
        elif grant.scope not in WRITE_SCOPES:
            raise InsufficientPermissions(
                f"Broadcasting needs scope 'readwrite' or 'admin'; this credential has '{grant.scope}'."
            )
        body = realtime.broadcast_body(msg.get("event"), msg.get("payload"))
        assert self.limiter is not None
        await self.limiter.hit(grant.limiter_name, *grant.rate)
        assert self.db is not None
        await realtime.insert_broadcast(self.db, grant.project_id, body, sub.topic)

    async def _topic_allows(self, grant: Grant, topic: str, action: str) -> None:
        """InsufficientPermissions unless the project's topic rules let `grant` do `action`."""
        now = asyncio.get_running_loop().time()
        cached = self._topic_rules.get(grant.project_id)
        if cached is None or now - cached[0] > TOPIC_RULES_TTL_S:
            assert self.db is not None
            raw = await self.db.fetchval(
                "SELECT topics FROM fluxbase.realtime_settings WHERE project_id = $1", grant.project_id
            )
            rules = realtime.parse_topic_rules(json.loads(raw)) if raw is not None else None
            cached = self._topic_rules[grant.project_id] = (now, rules)
            if len(self._topic_rules) > 10_000:
                self._topic_rules.clear()
        uid = grant.viewer.uid if grant.viewer is not None and grant.viewer.uid else None
        if not realtime.topic_allowed(cached[1], topic, action, grant.scope, uid):
            who = "end users" if uid else f"'{grant.scope}' credentials"
            raise InsufficientPermissions(
                f"The project's topic rules do not let {who} {action} on topic {topic!r}."
            )

    def _topic_sub(self, client: Client, room: str) -> Subscription:
        sub = client.subs.get(room)
        if sub is None or sub.grant is None or sub.topic is None:
            raise AuthRequired("Join the topic (subscribe to project_<id>:<topic>) before tracking presence.")
        return sub

    async def _track(self, client: Client, room: str, msg: dict[str, Any]) -> None:
        sub = self._topic_sub(client, room)
        assert sub.grant is not None and sub.topic is not None and self.presence is not None
        await self._topic_allows(sub.grant, sub.topic, "track")
        assert self.limiter is not None
        await self.limiter.hit(sub.grant.limiter_name, *sub.grant.rate)
        key = await self.presence.track(client, sub.project_id, sub.topic, msg.get("payload"))
        if client.subs.get(room) is not sub:  # left while tracking: take it back
            await self.presence.untrack(client, sub.project_id, sub.topic)
            return
        client.push(_dumps({"type": "tracked", "roomId": room, "key": key}))

    async def _untrack(self, client: Client, room: str) -> None:
        sub = self._topic_sub(client, room)
        assert sub.topic is not None and self.presence is not None
        await self.presence.untrack(client, sub.project_id, sub.topic)
        client.push(_dumps({"type": "untracked", "roomId": room}))

    async def _subscribe(
        self,
        client: Client,
        msg: dict[str, Any],
        url_token: str | None,
        origin: str | None,
    ) -> None:
        room = msg.get("roomId")
        project_id, topic = parse_room(room)
        assert isinstance(room, str)
        if room not in client.subs and len(client.subs) >= MAX_ROOMS_PER_SOCKET:
            raise ValidationError(f"A connection joins at most {MAX_ROOMS_PER_SOCKET} rooms.")
        grant = await self._grant(msg.get("token") or url_token, project_id, origin)
        if topic is not None:
            if any(msg.get(k) is not None for k in ("tables", "operations", "filters")):
                raise ValidationError(
                    "tables, operations and filters apply to the project room, not to topics."
                )
            await self._topic_allows(grant, topic, "join")
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
        filters = row_filters.parse(msg.get("filters"), frozenset(tables) if tables is not None else None)
        if filters:
            assert self.db is not None
            # Checked as the role the subscriber's rows are checked as (None: an admin).
            role = None if grant.viewer is None else role_name(project_id, grant.viewer.scope)
            # In the catalog of the project's own cluster (its reader, started if it is new,
            # brings the pool replays use there; the control plane's for the default cluster).
            await self.clusters.reader_for(self.db, project_id)
            catalog = await self.clusters.replay_db(self.db, project_id)
            await row_filters.check_columns(catalog, project_id, role, filters)
        since = msg.get("since")
        old = client.subs.get(room)
        if old is not None:
            self._leave(client, old)
        sub = Subscription(
            project_id,
            frozenset(tables) if tables is not None else None,
            frozenset(operations) if operations is not None else None,
            viewer=grant.viewer,
            grant=grant,
            topic=topic,
            room=room,
            filters=filters or None,
        )
        assert self.db is not None
        reader = await self.clusters.reader_for(self.db, project_id)
        await reader.ready.wait()
        upto = reader.position(project_id)
        if since is not None:
            start = realtime.parse_cursor(since)
            sub.held = []
        client.subs[room] = sub
        self.hub.join(client, sub)
        client.push(_dumps({"type": "subscribed", "roomId": room, "cursor": str(upto)}))
        if topic is not None and self.presence is not None:
            sub.watcher = Watcher(room, client.push)
            await self.presence.watch(project_id, topic, sub.watcher)
        if since is not None:
            await self._replay(client, sub, room, start, upto)

    async def _replay(
        self, client: Client, sub: Subscription, room: str, since: Cursor, upto: Cursor
    ) -> None:
        assert self.db is not None
        try:
            mark = await realtime.retention_mark(self.db, sub.project_id)
            if mark is not None and (since.xid, since.id) < (mark.xid, mark.id):
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
            outbox = await self.clusters.replay_db(self.db, sub.project_id)
            while not client.closed:
                events = await read_replay(outbox, sub.project_id, after, upto, 1000)
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


_background: set[asyncio.Task[Any]] = set()


class BoundedConnection(ServerConnection):
    """A server connection that drops a peer whose unsent bytes pass `max_unsent` when it sends.

    websockets answers every ping frame at once with a pong of the same payload, written to the
    transport whether or not the peer reads (pause_writing stops nothing): a peer that sends
    pings and reads nothing made the server hold every byte it sent, without bound. The hub's
    byte bound (hub.Client) counts only what the hub queues and is checked only when an event
    is delivered. Here, after each read, a transport holding more than `max_unsent` (twice the
    hub's bound: the hub may hand one part of up to half of it, plus an event, to a socket
    holding nothing) is aborted; its handler then cleans up."""

    max_unsent = 2 * DEFAULT_MAX_BYTES

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        transport = self.transport
        if not transport.is_closing() and transport.get_write_buffer_size() > self.max_unsent:
            CUT_OFF.inc()
            transport.abort()


def bounded_connection(max_bytes: int) -> type[BoundedConnection]:
    """`BoundedConnection` for a service whose per-socket bound is `max_bytes`."""
    return type("BoundedConnection", (BoundedConnection,), {"max_unsent": 2 * max_bytes})


def _abort(client: Any) -> None:
    """Drop a connection at once (it stopped answering pings): its handler then cleans up."""
    transport = getattr(getattr(client, "ws", None), "transport", None)
    if transport is not None:
        transport.abort()


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _json(connection: ServerConnection, status: HTTPStatus, body: dict[str, object]) -> Response:
    response = connection.respond(status, json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    return response


async def serve(
    settings: Settings,
    host: str,
    port: int,
    end_user_verifier: EndUserVerifier | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """Run the service until SIGINT/SIGTERM; `end_user_verifier` admits end-user credentials;
    `reuse_port` binds with SO_REUSEPORT, beside the other workers of one supervisor (workers)."""
    service = RealtimeService(settings, end_user_verifier)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with ws_serve(service.handler, host, port, reuse_port=reuse_port, **service.ws_options()):
            log.info("realtime listening on ws://%s:%s", host, port)
            await stop.wait()
    finally:
        await service.close()
