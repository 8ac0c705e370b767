"""Catalog confinement (issue 15, hostile review 1 finding 9; sql/0021, docs/security.md).

All projects share one database, and pg_catalog used to be readable by PUBLIC: a tenant role
read other projects' function bodies, defaults, comments, policies and row counters. Here a
second project stores a distinct marker in every kind of catalog content a tenant can write,
and every key scope of the first project tries each route to it. Each route is first run as the
platform (superuser) to show that it does reach the marker, so no route passes vacuously. The
tenant still introspects its own objects (information_schema, /api/schema, the RLS API), and a
catalog test fails if a later migration gives PUBLIC back any closed column or function.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from support import Api, bearer

MANY = 1_000_000
ROWS = 4241  # the row counters' marker

SETUP = [
    "CREATE FUNCTION fn_body() RETURNS text LANGUAGE sql AS $$ SELECT 'SECRET_PROSRC' $$",
    "CREATE FUNCTION fn_std() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT 'SECRET_SQLBODY'; END",
    "CREATE FUNCTION fn_arg(x text DEFAULT 'SECRET_ARGDEFAULT') RETURNS text LANGUAGE sql AS $$ SELECT x $$",
    "CREATE FUNCTION fn_cfg() RETURNS text LANGUAGE sql SET application_name = 'SECRET_PROCONFIG' "
    "AS $$ SELECT '' $$",
    "CREATE TABLE customers (id int PRIMARY KEY, plan text DEFAULT 'SECRET_DEFAULT', "
    "n int CONSTRAINT n_check CHECK (n <> length('SECRET_CHECK')))",
    f"INSERT INTO customers (id) SELECT g FROM generate_series(1, {ROWS}) g",
    "ALTER TABLE customers ADD COLUMN tier text DEFAULT 'SECRET_MISSING'",
    "CREATE INDEX customers_plan ON customers ((plan || 'SECRET_INDEXPRS')) WHERE plan <> 'SECRET_INDPRED'",
    "COMMENT ON TABLE customers IS 'SECRET_COMMENT'",
    "ALTER TABLE customers ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY p ON customers USING (plan <> 'SECRET_POLQUAL') WITH CHECK (plan <> 'SECRET_POLCHECK')",
    "CREATE VIEW v AS SELECT id FROM customers WHERE plan <> 'SECRET_VIEW'",
    "CREATE MATERIALIZED VIEW mv AS SELECT 'SECRET_MATVIEW' AS s",
    "CREATE RULE r AS ON UPDATE TO customers WHERE NEW.plan = 'SECRET_RULE' DO INSTEAD NOTHING",
    "CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "CREATE TRIGGER t1 BEFORE UPDATE ON customers FOR EACH ROW WHEN (NEW.plan <> 'SECRET_TGQUAL') "
    "EXECUTE FUNCTION trg('SECRET_TGARGS')",
    "CREATE DOMAIN d AS text DEFAULT 'SECRET_TYPDEFAULT' "
    "CONSTRAINT d_check CHECK (VALUE <> 'SECRET_DOMAINCHECK')",
    "CREATE TABLE parts (k text, v int) PARTITION BY LIST ((k || 'SECRET_PARTEXPR'))",
    "CREATE TABLE parts_a PARTITION OF parts FOR VALUES IN ('SECRET_PARTBOUND')",
    "CREATE STATISTICS st ON (plan || 'SECRET_STXEXPR'), id FROM customers",
    "CREATE AGGREGATE agg(text) (SFUNC = textcat, STYPE = text, INITCOND = 'SECRET_AGGINIT')",
]

# (route, marker): the route must not show the marker to another project's roles. `{s}` is the
# other project's schema. A marker of None: the route shows no text (a node tree of statements),
# so it must fail outright.
NS = "'{s}'::regnamespace"
CUSTOMERS = "'{s}.customers'::regclass"
ROUTES: list[tuple[str, str | None]] = [
    # pg_proc
    (f"SELECT prosrc FROM pg_proc WHERE pronamespace = {NS}", "SECRET_PROSRC"),
    (f"SELECT proconfig::text FROM pg_proc WHERE pronamespace = {NS}", "SECRET_PROCONFIG"),
    (f"SELECT pg_get_expr(proargdefaults, 0) FROM pg_proc WHERE pronamespace = {NS}", "SECRET_ARGDEFAULT"),
    (f"SELECT prosqlbody IS NOT NULL FROM pg_proc WHERE pronamespace = {NS}", None),
    (
        f"SELECT pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = {NS} AND prokind = 'f'",
        "SECRET_PROSRC",
    ),
    (f"SELECT pg_get_function_arguments(oid) FROM pg_proc WHERE pronamespace = {NS}", "SECRET_ARGDEFAULT"),
    (
        f"SELECT pg_get_function_arg_default(oid, 1) FROM pg_proc WHERE pronamespace = {NS}",
        "SECRET_ARGDEFAULT",
    ),
    (f"SELECT pg_get_function_sqlbody(oid) FROM pg_proc WHERE pronamespace = {NS}", "SECRET_SQLBODY"),
    (
        "SELECT a.agginitval FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid "
        f"WHERE p.pronamespace = {NS}",
        "SECRET_AGGINIT",
    ),
    # defaults, constraints, columns
    (f"SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = {CUSTOMERS}", "SECRET_DEFAULT"),
    (f"SELECT attmissingval::text FROM pg_attribute WHERE attrelid = {CUSTOMERS}", "SECRET_MISSING"),
    (f"SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint WHERE connamespace = {NS}", "SECRET_CHECK"),
    (f"SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = {NS}", "SECRET_CHECK"),
    (
        f"SELECT pg_get_constraintdef(oid, true) FROM pg_constraint WHERE connamespace = {NS}",
        "SECRET_DOMAINCHECK",
    ),
    (f"SELECT typdefault FROM pg_type WHERE typnamespace = {NS}", "SECRET_TYPDEFAULT"),
    (f"SELECT pg_get_expr(typdefaultbin, 0) FROM pg_type WHERE typnamespace = {NS}", "SECRET_TYPDEFAULT"),
    # indexes
    (f"SELECT pg_get_expr(indexprs, indrelid) FROM pg_index WHERE indrelid = {CUSTOMERS}", "SECRET_INDEXPRS"),
    (f"SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indrelid = {CUSTOMERS}", "SECRET_INDPRED"),
    (f"SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = {CUSTOMERS}", "SECRET_INDPRED"),
    (
        f"SELECT pg_get_indexdef(indexrelid, 1, true) FROM pg_index WHERE indrelid = {CUSTOMERS}",
        "SECRET_INDEXPRS",
    ),
    ("SELECT indexdef FROM pg_indexes WHERE schemaname = '{s}'", "SECRET_INDPRED"),
    # comments
    (f"SELECT description FROM pg_description WHERE objoid = {CUSTOMERS}", "SECRET_COMMENT"),
    (f"SELECT obj_description({CUSTOMERS}, 'pg_class')", "SECRET_COMMENT"),
    # policies
    (f"SELECT pg_get_expr(polqual, polrelid) FROM pg_policy WHERE polrelid = {CUSTOMERS}", "SECRET_POLQUAL"),
    (
        f"SELECT pg_get_expr(polwithcheck, polrelid) FROM pg_policy WHERE polrelid = {CUSTOMERS}",
        "SECRET_POLCHECK",
    ),
    ("SELECT qual FROM pg_policies WHERE schemaname = '{s}'", "SECRET_POLQUAL"),
    ("SELECT with_check FROM pg_policies WHERE schemaname = '{s}'", "SECRET_POLCHECK"),
    # views and rules
    ("SELECT pg_get_viewdef('{s}.v'::regclass)", "SECRET_VIEW"),
    ("SELECT pg_get_viewdef('{s}.v'::regclass, true)", "SECRET_VIEW"),
    ("SELECT pg_get_viewdef('{s}.v')", "SECRET_VIEW"),
    ("SELECT definition FROM pg_views WHERE schemaname = '{s}'", "SECRET_VIEW"),
    ("SELECT definition FROM pg_matviews WHERE schemaname = '{s}'", "SECRET_MATVIEW"),
    ("SELECT definition FROM pg_rules WHERE schemaname = '{s}'", "SECRET_RULE"),
    (f"SELECT pg_get_ruledef(oid) FROM pg_rewrite WHERE ev_class = {CUSTOMERS}", "SECRET_RULE"),
    (f"SELECT ev_qual IS NOT NULL FROM pg_rewrite WHERE ev_class = {CUSTOMERS}", None),
    ("SELECT ev_action IS NOT NULL FROM pg_rewrite WHERE ev_class = '{s}.v'::regclass", None),
    # triggers
    (f"SELECT tgqual IS NOT NULL FROM pg_trigger WHERE tgrelid = {CUSTOMERS}", None),
    (f"SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE tgrelid = {CUSTOMERS}", "SECRET_TGARGS"),
    (f"SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = {CUSTOMERS}", "SECRET_TGQUAL"),
    # partitions and extended statistics
    (
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = '{s}.parts_a'::regclass",
        "SECRET_PARTBOUND",
    ),
    ("SELECT pg_get_partition_constraintdef('{s}.parts_a'::regclass)", "SECRET_PARTBOUND"),
    ("SELECT pg_get_partkeydef('{s}.parts'::regclass)", "SECRET_PARTEXPR"),
    (
        "SELECT pg_get_expr(partexprs, partrelid) FROM pg_partitioned_table "
        "WHERE partrelid = '{s}.parts'::regclass",
        "SECRET_PARTEXPR",
    ),
    (
        f"SELECT pg_get_expr(stxexprs, stxrelid) FROM pg_statistic_ext WHERE stxnamespace = {NS}",
        "SECRET_STXEXPR",
    ),
    (
        f"SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext WHERE stxnamespace = {NS}",
        "SECRET_STXEXPR",
    ),
    (
        "SELECT pg_get_statisticsobjdef_expressions(oid)::text FROM pg_statistic_ext "
        f"WHERE stxnamespace = {NS}",
        "SECRET_STXEXPR",
    ),
    # row counters
    ("SELECT n_tup_ins FROM pg_stat_all_tables WHERE schemaname = '{s}'", str(ROWS)),
    ("SELECT n_live_tup FROM pg_stat_user_tables WHERE schemaname = '{s}'", str(ROWS)),
    (f"SELECT pg_stat_get_tuples_inserted({CUSTOMERS})", str(ROWS)),
    (f"SELECT pg_stat_get_live_tuples({CUSTOMERS})", str(ROWS)),
    ("SELECT heap_blks_hit FROM pg_statio_all_tables WHERE schemaname = '{s}'", None),
    ("SELECT idx_scan FROM pg_stat_all_indexes WHERE schemaname = '{s}'", None),
    # information_schema (filtered by privilege, as before) and the project's own deparsers
    ("SELECT column_default FROM information_schema.columns WHERE table_schema = '{s}'", "SECRET_DEFAULT"),
    (
        "SELECT routine_definition FROM information_schema.routines WHERE routine_schema = '{s}'",
        "SECRET_PROSRC",
    ),
    (
        "SELECT check_clause FROM information_schema.check_constraints WHERE constraint_schema = '{s}'",
        "SECRET_CHECK",
    ),
    ("SELECT view_definition FROM information_schema.views WHERE table_schema = '{s}'", "SECRET_VIEW"),
    (
        "SELECT action_condition FROM information_schema.triggers WHERE trigger_schema = '{s}'",
        "SECRET_TGQUAL",
    ),
    (
        "SELECT parameter_default FROM information_schema.parameters WHERE specific_schema = '{s}'",
        "SECRET_ARGDEFAULT",
    ),
    (
        "SELECT domain_default FROM information_schema.domains WHERE domain_schema = '{s}'",
        "SECRET_TYPDEFAULT",
    ),
    (
        "SELECT fluxbase_guard.own_column_default(adrelid, adnum) FROM pg_attrdef "
        f"WHERE adrelid = {CUSTOMERS}",
        "SECRET_DEFAULT",
    ),
    (
        f"SELECT fluxbase_guard.own_constraint_def(oid) FROM pg_constraint WHERE connamespace = {NS}",
        "SECRET_CHECK",
    ),
    (
        f"SELECT fluxbase_guard.own_index_def(indexrelid) FROM pg_index WHERE indrelid = {CUSTOMERS}",
        "SECRET_INDPRED",
    ),
    (
        f"SELECT fluxbase_guard.own_policy_expr(oid, false) FROM pg_policy WHERE polrelid = {CUSTOMERS}",
        "SECRET_POLQUAL",
    ),
]

# What sql/0021 closes to PUBLIC (None: the whole relation), for the catalog test.
CLOSED_COLUMNS: dict[str, list[str] | None] = {
    "pg_proc": ["prosrc", "probin", "prosqlbody", "proconfig", "proargdefaults"],
    "pg_attrdef": ["adbin"],
    "pg_attribute": ["attmissingval"],
    "pg_constraint": ["conbin"],
    "pg_index": ["indexprs", "indpred"],
    "pg_policy": ["polqual", "polwithcheck"],
    "pg_rewrite": ["ev_action", "ev_qual"],
    "pg_trigger": ["tgqual", "tgargs"],
    "pg_type": ["typdefaultbin", "typdefault"],
    "pg_class": ["relpartbound"],
    "pg_partitioned_table": ["partexprs"],
    "pg_statistic_ext": ["stxexprs"],
    "pg_publication_rel": ["prqual"],
    "pg_aggregate": ["agginitval", "aggminitval"],
    "pg_description": None,
    "pg_shdescription": None,
    "pg_seclabel": None,
    "pg_shseclabel": None,
    "pg_policies": ["qual", "with_check"],
    "pg_views": ["definition"],
    "pg_matviews": ["definition"],
    "pg_rules": ["definition"],
    "pg_indexes": ["indexdef"],
    "pg_seclabels": None,
    **{
        f"pg_{kind}_{scope}_{what}": None
        for kind in ("stat", "statio")
        for scope in ("all", "sys", "user")
        for what in ("tables", "indexes")
    },
    **{f"pg_statio_{scope}_sequences": None for scope in ("all", "sys", "user")},
    "pg_stat_user_functions": None,
    "information_schema.domains": ["domain_default"],
}
CLOSED_FUNCTIONS = [
    "pg_get_functiondef(oid)",
    "pg_get_function_arguments(oid)",
    "pg_get_function_arg_default(oid,integer)",
    "pg_get_function_sqlbody(oid)",
    "pg_get_viewdef(oid)",
    "pg_get_viewdef(oid,boolean)",
    "pg_get_viewdef(oid,integer)",
    "pg_get_viewdef(text)",
    "pg_get_viewdef(text,boolean)",
    "pg_get_ruledef(oid)",
    "pg_get_ruledef(oid,boolean)",
    "pg_get_triggerdef(oid)",
    "pg_get_triggerdef(oid,boolean)",
    "pg_get_indexdef(oid)",
    "pg_get_indexdef(oid,integer,boolean)",
    "pg_get_constraintdef(oid)",
    "pg_get_constraintdef(oid,boolean)",
    "pg_get_partkeydef(oid)",
    "pg_get_partition_constraintdef(oid)",
    "pg_get_statisticsobjdef(oid)",
    "pg_get_statisticsobjdef_columns(oid)",
    "pg_get_statisticsobjdef_expressions(oid)",
    "pg_stat_get_tuples_inserted(oid)",
    "pg_stat_get_live_tuples(oid)",
    "pg_stat_get_numscans(oid)",
    "pg_stat_get_function_calls(oid)",
]


async def _sql(api: Api, key: str, pid: str, q: str) -> dict[str, Any]:
    r = await api.http.post("/api/execute-sql", json={"projectId": pid, "query": q}, headers=bearer(key))
    return dict(r.json())


async def _other_project(api: Api) -> tuple[str, str, str]:
    """A second project with a marker in every kind of catalog content; (id, owner token, admin key)."""
    _, owner = await api.new_user()
    other = await api.new_project(owner)
    admin = await api.new_key(owner, other, "admin", rateLimitRequests=MANY)
    for q in SETUP:
        body = await _sql(api, admin, other, q)
        assert body["success"], (q, body)
    return other, owner, admin


async def _counters_flushed(control_db: asyncpg.Pool, schema: str) -> None:
    """Wait (bounded) until the statistics system shows the inserts, so the counter routes can leak."""
    deadline = time.monotonic() + 30
    async with control_db.acquire() as conn:
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            n = await conn.fetchval(
                "SELECT n_tup_ins FROM pg_stat_all_tables WHERE schemaname = $1 AND relname = 'customers'",
                schema,
            )
            if n == ROWS:
                return
            assert time.monotonic() < deadline, f"statistics never showed the inserts ({n})"
            await asyncio.sleep(0.2)


async def test_other_projects_catalog_content_is_closed_to_every_key_scope(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    other, _, other_admin = await _other_project(api)
    schema = f"p_{other}"
    await _counters_flushed(control_db, schema)
    routes = [(q.replace("{s}", schema), marker) for q, marker in ROUTES]
    # Each route reaches its marker for a role allowed to read it (the platform; for the own_*
    # deparsers, the other project itself): none passes vacuously.
    async with control_db.acquire() as conn:
        for q, marker in routes:
            if "fluxbase_guard.own_" in q:
                assert marker is not None and marker in str(await _sql(api, other_admin, other, q)), q
                continue
            try:
                rows = await conn.fetch(q)
            except asyncpg.PostgresError as exc:
                raise AssertionError(q) from exc
            shown = str([list(r.values()) for r in rows])
            if marker is None:
                assert rows and any(v is not None for r in rows for v in r.values()), q
            else:
                assert marker in shown, (q, shown)
    leaks = []
    for scope in ("admin", "readwrite", "read"):
        key = await api.new_key(project.owner_token, project.id, scope, rateLimitRequests=MANY)
        for q, marker in routes:
            body = await _sql(api, key, project.id, q)
            text = str(body)
            if marker is None:
                if body.get("success"):
                    leaks.append((scope, q, "succeeded"))
            elif marker in text:
                leaks.append((scope, q, marker))
    assert leaks == []


async def test_a_project_still_introspects_its_own_objects(api: Api, control_db: asyncpg.Pool) -> None:
    other, owner, admin = await _other_project(api)
    keys = {
        "admin": admin,
        "readwrite": await api.new_key(owner, other, "readwrite", rateLimitRequests=MANY),
        "read": await api.new_key(owner, other, "read", rateLimitRequests=MANY),
    }
    s = f"p_{other}"
    for scope, key in keys.items():
        body = await _sql(
            api, key, other, f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{s}'"
        )
        assert body["success"], body
        assert {"table_name": "customers"} in body["result"]["rows"], (scope, body)
        body = await _sql(
            api,
            key,
            other,
            "SELECT column_name, data_type, column_default FROM information_schema.columns "
            f"WHERE table_schema = '{s}' AND table_name = 'customers' ORDER BY ordinal_position",
        )
        assert body["success"], body
        rows = body["result"]["rows"]
        assert [r["column_name"] for r in rows] == ["id", "plan", "n", "tier"], (scope, rows)
        assert rows[1]["column_default"] == "'SECRET_DEFAULT'::text", (scope, rows)
        # Listings keep their name columns: only the content columns are closed.
        for q in (
            f"SELECT table_name FROM information_schema.views WHERE table_schema = '{s}'",
            f"SELECT policyname, cmd, roles FROM pg_policies WHERE schemaname = '{s}'",
            f"SELECT viewname FROM pg_views WHERE schemaname = '{s}'",
            f"SELECT indexname FROM pg_indexes WHERE schemaname = '{s}'",
            "SELECT proname, pg_get_function_identity_arguments(oid) FROM pg_proc "
            f"WHERE pronamespace = '{s}'::regnamespace",
            f"SELECT pg_relation_size('{s}.customers') > 0 AS sized",
        ):
            body = await _sql(api, key, other, q)
            assert body["success"] and body["result"]["rows"], (scope, q, body)
    # The owner reads its routines' bodies and its check constraints through information_schema.
    body = await _sql(
        api,
        admin,
        other,
        f"SELECT routine_definition FROM information_schema.routines WHERE routine_schema = '{s}'",
    )
    assert "SECRET_PROSRC" in str(body), body
    body = await _sql(
        api,
        admin,
        other,
        f"SELECT check_clause FROM information_schema.check_constraints WHERE constraint_schema = '{s}'",
    )
    assert "SECRET_CHECK" in str(body), body
    # /api/schema and the RLS API deparse the project's own defaults, constraints, indexes, policies.
    r = await api.http.get("/api/schema", params={"projectId": other}, headers=bearer(admin))
    assert r.status_code == 200, r.text
    for marker in ("SECRET_DEFAULT", "SECRET_CHECK", "SECRET_INDPRED"):
        assert marker in r.text, marker
    r = await api.http.get(f"/api/projects/{other}/rls", headers=bearer(admin))
    assert r.status_code == 200, r.text
    assert "SECRET_POLQUAL" in r.text and "SECRET_POLCHECK" in r.text, r.text
    # Deparsed for the project's search_path, as its own session prints it: names unqualified.
    async with control_db.acquire() as conn:
        seq_default = await conn.fetchval(
            f"SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = '{s}.customers'::regclass "
            "AND adnum = 2"
        )
    body = await _sql(api, admin, other, "CREATE TABLE serials (id serial PRIMARY KEY)")
    assert body["success"], body
    r = await api.http.get("/api/schema", params={"projectId": other}, headers=bearer(admin))
    assert "nextval('serials_id_seq'::regclass)" in r.text, r.text
    assert seq_default == "'SECRET_DEFAULT'::text"
    # Export: pg_dump reads the project's code as its export role, which no key role can become.
    r = await api.http.get(f"/api/projects/{other}/export", headers=bearer(admin))
    assert r.status_code == 200, r.text
    for marker in ("SECRET_PROSRC", "SECRET_VIEW", "SECRET_POLQUAL", "SECRET_TGQUAL", "SECRET_COMMENT"):
        assert marker.encode() in r.content, marker
    assert r.content.rstrip().splitlines()[-1].startswith(b"-- fluxbase-export-end sha256="), r.content[-300:]
    exporter = f"p_{other}_ex"
    async with control_db.acquire() as conn:
        assert await conn.fetchval("SELECT pg_has_role($1, 'fluxbase_catalog_reader', 'USAGE')", exporter)
        for scope in ("admin", "rw", "ro", "rt"):
            assert not await conn.fetchval(
                "SELECT pg_has_role($1, $2, 'MEMBER')", f"p_{other}_{scope}", exporter
            )
    # Deleting the project drops its export role with the others.
    r = await api.http.delete(f"/api/projects/{other}", headers=bearer(owner))
    assert r.status_code == 200, r.text
    async with control_db.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p_{other}%") == 0


async def test_public_holds_no_closed_catalog_content(control_db: asyncpg.Pool) -> None:
    """Fails if a migration gives PUBLIC back a closed column, view or function, if any
    pg_node_tree column of pg_catalog is readable by PUBLIC (pg_get_expr deparses any node tree,
    with no privilege check), or if a tenant role can read as the catalog reader."""
    async with control_db.acquire() as conn:
        reopened = []
        for rel, cols in CLOSED_COLUMNS.items():
            relid = await conn.fetchval(
                "SELECT $1::regclass::oid", rel if "." in rel else f"pg_catalog.{rel}"
            )
            if cols is None:
                cols = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT attname FROM pg_attribute "
                        "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                        relid,
                    )
                ]
                if await conn.fetchval("SELECT has_table_privilege('public', $1::oid, 'SELECT')", relid):
                    reopened.append(rel)
            for col in cols:
                if await conn.fetchval(
                    "SELECT has_column_privilege('public', $1::oid, $2, 'SELECT')", relid, col
                ):
                    reopened.append(f"{rel}.{col}")
                assert await conn.fetchval(
                    "SELECT has_column_privilege('fluxbase_catalog_reader', $1::oid, $2, 'SELECT')",
                    relid,
                    col,
                ), f"the platform's reader lost {rel}.{col}"
        for fn in CLOSED_FUNCTIONS:
            if await conn.fetchval(
                "SELECT has_function_privilege('public', $1, 'EXECUTE')", f"pg_catalog.{fn}"
            ):
                reopened.append(fn)
        assert reopened == []
        node_trees = await conn.fetch(
            """SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
               WHERE c.relnamespace = 'pg_catalog'::regnamespace AND a.atttypid = 'pg_node_tree'::regtype
                 AND NOT a.attisdropped AND has_column_privilege('public', c.oid, a.attnum, 'SELECT')"""
        )
        assert [r[0] for r in node_trees] == []
        # No project role reads as the platform: not a member, directly or through another role.
        members = await conn.fetch(
            r"""SELECT rolname FROM pg_roles WHERE rolname ~ '^p_[0-9a-f]{16}_(admin|rw|ro|rt)$'
                  AND pg_has_role(oid, 'fluxbase_catalog_reader', 'USAGE')"""
        )
        assert [r[0] for r in members] == []
