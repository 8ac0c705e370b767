"""PostgreSQL going away and coming back: bounded 503s, then recovery without a restart."""

from __future__ import annotations

import asyncio
import time

from conftest import spawn_instance
from support import Api, assert_error, start_stack, stop_stack


async def test_database_down_then_back(tmp_path, log_dir) -> None:
    # A private PostgreSQL we can stop and start (the session one is shared by other tests).
    stack = start_stack(tmp_path)
    try:
        async with spawn_instance(stack, log_dir) as inst:
            api = Api(inst.url)
            try:
                _, token = await api.new_user()
                pid = await api.new_project(token)
                key = await api.new_key(token, pid)
                assert (await api.sql(key, pid, "CREATE TABLE t (id int)")).json()["success"]
                assert stack.pg is not None
                stack.pg.stop("fast")
                t0 = time.monotonic()
                r = await api.sql(key, pid, "INSERT INTO t VALUES (1)")
                assert_error(r, 503, "DATABASE_CONNECTION_ERROR")
                assert time.monotonic() - t0 < 10
                r = await api.http.get(f"/api/projects/{pid}", headers={"Authorization": f"Bearer {key}"})
                assert_error(r, 503, "DATABASE_CONNECTION_ERROR")
                assert (await api.http.get("/ready")).status_code == 503
                stack.pg.start()
                # Recovers by itself: pools reconnect on the next request.
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    r = await api.sql(key, pid, "INSERT INTO t VALUES (2)")
                    if r.status_code == 200 and r.json()["success"]:
                        break
                    await asyncio.sleep(0.2)
                body = (await api.sql(key, pid, "SELECT array_agg(id) AS ids FROM t")).json()
                # The write attempted while the server was down never appears.
                assert body["result"]["rows"][0]["ids"] == [2]
            finally:
                await api.close()
    finally:
        stop_stack(stack)


async def test_connection_killed_mid_write_never_reports_success(api: Api, project, control_db) -> None:
    assert (await api.sql(project.admin_key, project.id, "CREATE TABLE w (id int)")).json()["success"]
    write = asyncio.create_task(
        api.sql(project.admin_key, project.id, "INSERT INTO w SELECT 1 FROM pg_sleep(3)")
    )
    victim = None
    for _ in range(50):
        await asyncio.sleep(0.1)
        victim = await control_db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'INSERT INTO w%'",
            f"p_{project.id}_admin",
        )
        if victim:
            break
    assert victim, "the write never started"
    await control_db.execute("SELECT pg_terminate_backend($1)", victim)
    r = await write
    assert_error(r, 503, "DATABASE_CONNECTION_ERROR")
    body = (await api.sql(project.admin_key, project.id, "SELECT count(*) AS n FROM w")).json()
    assert body["result"]["rows"] == [{"n": 0}]
