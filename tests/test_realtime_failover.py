"""Kill the realtime service and restart PostgreSQL under write load: clients resume, no gap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import asyncpg
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import spawn_instance
from fluxbase.devstack.procs import free_port
from support import Api, run_service, start_stack, stop_stack


async def test_realtime_and_postgres_restart_under_load_lose_nothing(tmp_path, log_dir) -> None:
    stack = start_stack(tmp_path)
    try:
        async with spawn_instance(stack, log_dir) as inst:
            api = Api(inst.url)
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, rateLimitRequests=1_000_000)
            assert (await api.sql(key, pid, "CREATE TABLE items (id serial PRIMARY KEY, v int)")).json()[
                "success"
            ]
            await api.close()
            port = free_port()
            env = dict(inst.env, FLUXBASE_REALTIME_PORT=str(port))
            url = f"ws://127.0.0.1:{port}/?token={key}"
            committed: set[int] = set()
            uncertain: set[int] = set()
            received: list[int] = []
            errors: list[str] = []
            stop = asyncio.Event()
            subscribed = asyncio.Event()  # live delivery to the subscriber has begun
            written = asyncio.Event()  # the writer is done: `committed` is final

            async def writer() -> None:
                try:
                    await write()
                finally:
                    written.set()

            async def write() -> None:
                dsn = stack.database_url(inst.dbname)
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        conn = await asyncpg.connect(dsn, timeout=2)
                        try:
                            while not stop.is_set():
                                await conn.execute(f"INSERT INTO p_{pid}.items (v) VALUES ($1)", i)
                                committed.add(i)
                                i += 1
                                await asyncio.sleep(0.005)
                        finally:
                            with contextlib.suppress(Exception):
                                await conn.close()
                    except Exception as exc:  # any driver error while PostgreSQL restarts
                        errors.append(repr(exc))
                        uncertain.add(i)  # the commit may or may not have happened
                        await asyncio.sleep(0.1)

            async def subscriber() -> None:
                cursor = None
                while True:
                    try:
                        async with connect(url, open_timeout=2) as ws:
                            msg = {"type": "subscribe", "roomId": f"project_{pid}"}
                            if cursor:
                                msg["since"] = cursor
                            await ws.send(json.dumps(msg))
                            # Until the writer is done, not merely told to stop: its last INSERT
                            # may still be in flight, then commit and join `committed`.
                            while not (written.is_set() and committed <= set(received)):
                                try:
                                    raw = await asyncio.wait_for(ws.recv(), 1)
                                except TimeoutError:
                                    continue
                                m = json.loads(raw)
                                if m["type"] == "db_event":
                                    received.append(m["payload"]["record"]["v"])
                                    cursor = m["cursor"]
                                elif m["type"] == "subscribed":
                                    # The first subscribe has no `since`: what came before it is
                                    # not the subscriber's. Resuming from here replays what is
                                    # committed after it (a resume's own position is not taken:
                                    # its replay follows the `subscribed`).
                                    if cursor is None:
                                        cursor = m["cursor"]
                                    subscribed.set()
                                elif m["type"] == "error":
                                    await asyncio.sleep(0.2)
                                    break
                            else:
                                return
                    except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, ValueError) as exc:
                        errors.append(repr(exc))
                        await asyncio.sleep(0.2)

            with run_service(["realtime"], env, port, log_dir) as rt1:
                sub = asyncio.create_task(subscriber())
                # Writes begin once the subscription stands: a row committed before it is no
                # event the subscriber was promised.
                await asyncio.wait_for(subscribed.wait(), 30)
                wr = asyncio.create_task(writer())
                await asyncio.sleep(1.5)
                rt1.proc.send_signal(signal.SIGKILL)
                rt1.proc.wait(10)
            await asyncio.sleep(1.0)  # writes continue while no realtime service runs
            with run_service(["realtime"], env, port, log_dir):
                await asyncio.sleep(1.5)
                assert stack.pg is not None
                stack.pg.stop("fast")
                await asyncio.sleep(1.0)
                stack.pg.start()
                await asyncio.sleep(2.5)
                stop.set()
                await wr
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(sub), 30)
                sub.cancel()
            assert len(committed) > 100
            got = set(received)
            assert committed <= got, (
                f"lost {len(committed - got)} of {len(committed)}: {sorted(committed - got)[:10]}; "
                f"uncertain {sorted(uncertain)}; received {len(received)}; client errors {errors[-5:]}"
            )
            assert got <= committed | uncertain
            assert len(received) == len(got), "duplicates after resume"
    finally:
        stop_stack(stack)
