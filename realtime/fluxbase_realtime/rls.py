"""Filtered delivery: which events a subscriber that is not an admin may receive.

A subscriber receives a row event only if it could SELECT the row with SQL: read keys as the
project's read role and readwrite keys as its readwrite role, with the anonymous identity
(auth.uid() null), end users with their identity and the role of the key that admitted them
(the read role for end-user JWTs presented directly). That is the role's table privilege and,
on tables with RLS, the SELECT policies that apply to the role, evaluated by PostgreSQL as that
very role (sql/0015: the checker role `p_<id>_rt` does SET ROLE; never a privileged role). The
image of INSERT and UPDATE is the new row, that of DELETE the old row (its last state); an image
cut to its small fields (over 1 MiB) must still name every column the policies refer to. An UPDATE
whose old row the subscriber could not see arrives with `old: null`, so a row moving into view
does not reveal what it was before. Schema events reach keys, and end users only if the project
allows it (`fluxbase.realtime_settings`); broadcasts reach everyone.

Cost per batch, project and role: one query for the tables' privileges and policies, then one
evaluation per distinct viewer (all tables at once, `fluxbase_guard.visible_rows_as`) — all read
keys of a project are one viewer, as are all readwrite keys — whatever the number of sockets;
viewers are sent in groups (up to MAX_USERS_PER_QUERY per query) spread over the pool. A check
that fails denies that viewer's events of the batch (fail closed, logged) and nobody else's; a
group that times out is retried viewer by viewer to find the culprit. Checks run in READ ONLY
transactions (a policy is tenant code: its side effects fail, and so does its check), and a check
past its timeout has its backend terminated, not only cancelled (PL/pgSQL can swallow a cancel).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import msgspec

from fluxbase.config import Settings
from fluxbase.db.quoting import quote_ident
from fluxbase.security import tokens
from fluxbase.security.roles import CHECKER, role_name, schema_name
from fluxbase.services.identity import IdentityResolver
from fluxbase.tenancy import session
from fluxbase.tenancy.pools import TenantPool, TenantPools
from fluxbase_realtime.outbox import OutboxEvent

log = logging.getLogger("fluxbase.realtime.rls")


@dataclass(frozen=True)
class Viewer:
    """A subscriber as SQL sees it: the role its checks run as (`scope`: read or readwrite),
    and auth.uid() ('' for none: a key), auth.jwt() (JSON text) and auth.role()."""

    uid: str
    claims: str
    role: str
    scope: str = "read"

    @classmethod
    def of(cls, uid: str, claims: dict[str, Any], role: str, scope: str = "read") -> Viewer:
        return cls(uid, msgspec.json.encode(claims).decode(), role, scope)

    @property
    def is_key(self) -> bool:
        """An API key (or a token without an end user): anonymous identity."""
        return not self.uid


@dataclass(frozen=True)
class EndUser:
    """What an end-user credential verifier returns: whose project, who, and the claims."""

    project_id: str
    auth_uid: str
    claims: dict[str, Any]


# The integration point for end-user JWTs: given a credential that is neither an API key nor a
# realtime token, and the project it is presented for, return the end user it proves, None if it
# is not such a credential, or raise a FluxbaseError (expired, bad signature...) to refuse it.
EndUserVerifier = Callable[[str, str], Awaitable[EndUser | None]]


def resolver_verifier(resolver: IdentityResolver) -> EndUserVerifier:
    """End-user JWTs as /api/execute-sql accepts them (X-Fluxbase-User-Token): a project user's
    own token (its session is looked up, so logout and disabling refuse it) or a token from the
    project's external identity provider (jwtSecret / jwksUri, issuers, audiences)."""

    async def verify(credential: str, project_id: str) -> EndUser | None:
        try:
            unverified = jwt.decode(credential, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None  # not a JWT: not an end-user credential
        if unverified.get("iss") == tokens.ISSUER and "typ" in unverified:
            return None  # a Fluxbase realtime or dashboard token that did not verify
        claims = await resolver.claims(project_id, credential)
        return EndUser(project_id, str(claims["sub"]), claims)

    return verify


_POLICIES_SQL = "SELECT * FROM fluxbase_guard.scope_policies($1, $2::text[], $3)"
_VISIBLE_SQL = (
    "SELECT user_no, check_no, ord, failed FROM fluxbase_guard.visible_rows_as("
    "$1, $2, $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])"
)
MAX_USERS_PER_QUERY = 100


class _Payload(msgspec.Struct):
    operation: str = ""
    record: msgspec.Raw = msgspec.Raw(b"null")
    old: msgspec.Raw = msgspec.Raw(b"null")


class _Message(msgspec.Struct):
    payload: _Payload


_decode_message = msgspec.json.Decoder(_Message).decode


@dataclass(frozen=True)
class _TablePolicies:
    rls_enabled: bool
    can_select: bool
    permissive: list[str]
    restrictive: list[str]


def check_sql(schema: str, table: str, permissive: list[str], restrictive: list[str]) -> str:
    """One table's visibility check: the ordinals of the row images ($1) that pass its policies
    ($2: the check number, $3: the user number, echoed for the caller).

    The row type is the table's own, aliased as the table, so the deparsed quals (which refer to
    its columns, or to it by name) mean exactly what they mean in a query on the table.

    An image must name every column the table's SELECT policies refer to (all of them for a
    policy that refers to the whole row, `table.*`), as to_jsonb of a row does, nulls included:
    one over 1 MiB keeps only its small fields (sql/0022), and a column it lost would read as
    null, which a policy may let through (a deny list, `NOT (auth.uid() = ANY (coalesce(blocked,
    '{}')))`: hostile review 22). Such an image, or one older than a column a policy came to
    refer to, is not visible (fail closed). The columns come from the policies' dependencies
    (pg_depend), in one sub-select per check.
    """
    where = " OR ".join(f"({q})" for q in permissive)
    if restrictive:
        where = f"({where}) AND " + " AND ".join(f"({q})" for q in restrictive)
    rowtype = f"{quote_ident(schema)}.{quote_ident(table)}"
    literal = "'" + rowtype.replace("'", "''") + "'"
    # A whole-row reference (deparsed `table.*`, the name quoted only where it must be) records
    # no column in pg_depend: every column then (a mere mention of the text is only stricter).
    marks = (f"{table}.*", f"{quote_ident(table)}.*")
    whole_row = any(m in q for q in (*permissive, *restrictive) for m in marks)
    needed = _ALL_KEYS if whole_row else _NEEDED_KEYS
    return (
        "SELECT $3::integer, $2::integer, __fx_in.__fx_ord, NULL::text "
        "FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS __fx_in(__fx_row, __fx_ord) "
        f"CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{rowtype}, "
        f"__fx_in.__fx_row) AS {quote_ident(table)} "
        f"WHERE __fx_in.__fx_row OPERATOR(pg_catalog.?&) ({needed.format(rel=literal)}) AND ({where})"
    )


# The columns an image must name for the SELECT policies of a table ({rel}, a quoted literal) to
# be evaluated on it: those a policy's expressions depend on (pg_depend, deptype 'n'; every column
# for a dependency on the table itself, refobjsubid 0). A whole-row reference records none
# (PostgreSQL's find_expr_references): check_sql takes _ALL_KEYS for it. By the table's side of
# pg_depend (its reference index): about 0.06 ms a check, against 0.7 ms by the policies' side.
_NEEDED_KEYS = (
    "SELECT coalesce(pg_catalog.array_agg(a.attname::text), '{{}}') FROM pg_catalog.pg_attribute a "
    "WHERE a.attrelid = {rel}::pg_catalog.regclass AND a.attnum OPERATOR(pg_catalog.>) 0 "
    "AND NOT a.attisdropped AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend d "
    "WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = a.attrelid "
    "AND d.refobjsubid IN (0, a.attnum) AND d.deptype = 'n' "
    "AND d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass "
    "AND d.objid IN (SELECT p.oid FROM pg_catalog.pg_policy p "
    "WHERE p.polrelid = a.attrelid AND p.polcmd IN ('r', '*')))"
)
_ALL_KEYS = (
    "SELECT coalesce(pg_catalog.array_agg(a.attname::text), '{{}}') FROM pg_catalog.pg_attribute a "
    "WHERE a.attrelid = {rel}::pg_catalog.regclass AND a.attnum OPERATOR(pg_catalog.>) 0 "
    "AND NOT a.attisdropped"
)


class RlsGate:
    """Decides, per batch, which events each distinct end user of a project may receive."""

    def __init__(self, settings: Settings, control: asyncpg.Pool):
        # `control`: the checker roles connect to the project's own cluster (services.clusters).
        # Policy lookups and checks only (pool.fetch): no one-round-trip prefix to prepare.
        self.pools = TenantPools(
            settings, max_size=settings.realtime.rls_pool_max, control=control, prefix=False
        )
        self.timeout_s = settings.realtime.rls_timeout_ms / 1000
        self.pool_max = settings.realtime.rls_pool_max
        self.control = control
        self.queries = 0  # round trips to tenant roles (tests and benchmarks read it)
        self.failures = 0

    async def close(self) -> None:
        await self.pools.close()

    async def decide(
        self, project_id: str, viewers: Collection[Viewer], events: Sequence[OutboxEvent]
    ) -> dict[Viewer, dict[int, bytes]]:
        """For each viewer: event index → the message to send it (absent: not for this viewer)."""
        out: dict[Viewer, dict[int, bytes]] = {v: {} for v in viewers}
        if not viewers:
            return out
        rows: list[int] = []
        schema_ok: bool | None = None
        for i, ev in enumerate(events):
            if ev.kind == "row":
                rows.append(i)
            elif ev.kind == "schema":
                if schema_ok is None and any(not v.is_key for v in viewers):
                    schema_ok = await self._schema_allowed(project_id)
                for viewer, allowed in out.items():
                    if viewer.is_key or schema_ok:
                        allowed[i] = ev.message
            else:
                for allowed in out.values():
                    allowed[i] = ev.message
        if rows:
            by_scope: dict[str, list[Viewer]] = {}
            for v in viewers:
                by_scope.setdefault(v.scope, []).append(v)
            await asyncio.gather(
                *(self._rows(project_id, scope, vs, events, rows, out) for scope, vs in by_scope.items())
            )
        return out

    async def _read_only(self, pool: TenantPool, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run a check in a READ ONLY transaction, so that whatever a policy does (it is tenant
        code) writes nothing: not past the project's quota, not to a read-only project. Past the
        timeout the backend is terminated through the control connection, since a policy that
        swallows query_canceled would otherwise keep running with nobody waiting for it."""
        async with pool.connection() as conn:  # (terminated on any error: state unknown)
            await conn.execute("BEGIN READ ONLY")
            try:
                rows = await conn.fetch(query, *args, timeout=self.timeout_s)
            except TimeoutError:
                await session.terminate(self.control, conn)
                raise
            await conn.execute("ROLLBACK")  # (read only: nothing to keep)
            return list(rows)

    async def _schema_allowed(self, project_id: str) -> bool:
        try:
            return bool(
                await self.control.fetchval(
                    "SELECT schema_events_to_users FROM fluxbase.realtime_settings WHERE project_id = $1",
                    project_id,
                )
            )
        except Exception as exc:
            log.warning(
                "could not read the realtime settings of %s (%r): schema events withheld", project_id, exc
            )
            return False

    async def _rows(
        self,
        project_id: str,
        scope: str,
        viewers: Collection[Viewer],
        events: Sequence[OutboxEvent],
        rows: list[int],
        out: dict[Viewer, dict[int, bytes]],
    ) -> None:
        schema = schema_name(project_id)
        role = role_name(project_id, scope if scope in ("read", "readwrite") else "read")
        tables = sorted({t for t in (events[i].table for i in rows) if t is not None})
        try:
            pool = await self.pools.pool(project_id, CHECKER)
            self.queries += 1
            found = {
                r["table_name"]: _TablePolicies(
                    r["rls_enabled"], r["can_select"], list(r["permissive"]), list(r["restrictive"])
                )
                for r in await pool.fetch(_POLICIES_SQL, schema, tables, role, timeout=self.timeout_s)
            }
        except Exception as exc:
            self.failures += 1
            log.warning(
                "RLS policy lookup failed for project %s as %s (%r): row events withheld",
                project_id,
                scope,
                exc,
            )
            return
        # Row images per table that needs a check; images of UPDATEs are (new, old).
        checks: list[str] = []
        images: list[list[bytes]] = []
        check_of: dict[str, int] = {}
        image_at: dict[int, tuple[int, int, int | None]] = {}  # event index → (check, new ord, old ord)
        public: list[int] = []
        for i in rows:
            ev = events[i]
            pol = found.get(ev.table or "")
            if pol is None or not pol.can_select:
                continue  # dropped since, or the role may not SELECT it: none of these viewers sees it
            if not pol.rls_enabled:
                public.append(i)
                continue
            if not pol.permissive:
                continue  # RLS on without a SELECT policy: nothing is visible
            assert ev.table is not None
            c = check_of.get(ev.table)
            if c is None:
                c = check_of[ev.table] = len(checks)
                checks.append(check_sql(schema, ev.table, pol.permissive, pol.restrictive))
                images.append([])
            msg = _decode_message(ev.message).payload
            batch = images[c]
            batch.append(bytes(msg.record))
            new_ord = len(batch)
            old_ord = None
            if ev.operation == "UPDATE" and bytes(msg.old) != b"null":
                batch.append(bytes(msg.old))
                old_ord = len(batch)
            image_at[i] = (c, new_ord, old_ord)
        for viewer in viewers:
            allowed = out[viewer]
            for i in public:
                allowed[i] = events[i].message
        if not checks:
            return
        rows_text = [b"[" + b",".join(batch) + b"]" for batch in images]
        args = [r.decode() for r in rows_text]
        stripped: dict[int, bytes] = {}

        def apply(viewer: Viewer, result: list[asyncpg.Record]) -> None:
            failed = {r["check_no"] - 1 for r in result if r["failed"] is not None}
            for r in result:
                if r["failed"] is not None:
                    self.failures += 1
                    log.warning(
                        "RLS policy error on project %s: %s (events withheld)", project_id, r["failed"]
                    )
            visible = {(r["check_no"] - 1, r["ord"]) for r in result if r["failed"] is None}
            allowed = out[viewer]
            for i, (c, new_ord, old_ord) in image_at.items():
                if c in failed or (c, new_ord) not in visible:
                    continue
                if old_ord is None or (c, old_ord) in visible:
                    allowed[i] = events[i].message
                else:
                    if i not in stripped:
                        stripped[i] = _without_old(events[i].message)
                    allowed[i] = stripped[i]

        async def check(group: list[Viewer]) -> None:
            try:
                self.queries += 1
                result = await self._read_only(
                    pool,
                    _VISIBLE_SQL,
                    schema,
                    role,
                    [v.uid for v in group],
                    [v.claims for v in group],
                    [v.role for v in group],
                    checks,
                    args,
                )
            except Exception as exc:
                if len(group) > 1:
                    # A timeout or lost connection: find the user it was, one by one.
                    await asyncio.gather(*(check([v]) for v in group))
                    return
                self.failures += 1
                log.warning(
                    "RLS check failed for an end user of project %s (%r): their row events withheld",
                    project_id,
                    exc,
                )
                return
            per_user: list[list[asyncpg.Record]] = [[] for _ in group]
            for r in result:
                per_user[r["user_no"] - 1].append(r)
            for viewer, rows_of in zip(group, per_user, strict=True):
                apply(viewer, rows_of)

        # Users are checked in groups, one query per group, enough groups to keep every
        # connection of the pool busy.
        users = list(viewers)
        size = max(1, min(MAX_USERS_PER_QUERY, -(-len(users) // self.pool_max)))
        await asyncio.gather(*(check(users[k : k + size]) for k in range(0, len(users), size)))


def _without_old(message: bytes) -> bytes:
    body = msgspec.json.decode(message)
    body["payload"]["old"] = None
    return msgspec.json.encode(body)
