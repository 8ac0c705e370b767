"""Faults survived, nothing lost (issue 18): under write load through /api/execute-sql, with
realtime subscribers resuming by cursor and a webhook endpoint receiving, SIGKILL in turn the
realtime service, the webhook worker and the API, then stop PostgreSQL immediately; each is
restarted. Every committed row reaches every consumer exactly once (the endpoint: a repeat only
under the same webhook-id), nothing uncommitted is delivered, the API answers 503 and never 500
while PostgreSQL is down, and recovers by itself. Last, the S3 server is SIGKILLed during uploads
(through the API and presigned POSTs straight to S3): the API answers 503 STORAGE_UNAVAILABLE and
never 500, recovers by itself, and after housekeeping every file row has its object and every
object a row. The tests run in order on one rig."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chaossupport import Outcome, Rig, table
from support import start_stack, stop_stack

OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> AsyncIterator[Rig]:
    # Its own PostgreSQL (never the session's): one test stops it. Durable (fsync and synchronous
    # commit on): an immediate stop of the fast test settings may drop acknowledged commits.
    stack = start_stack(tmp_path_factory.mktemp("chaos"), durable=True)
    r = Rig(stack, log_dir)
    try:
        await r.start()
        yield r
    finally:
        try:
            await r.close()
        finally:
            stop_stack(stack)
        if OUTCOMES:
            print("\n" + table(OUTCOMES))


def check(rig: Rig, o: Outcome) -> None:
    OUTCOMES.append(o)
    print(f"\n{table([o])}\nfailed writes: {dict(o.statuses)}; api back after {o.api_recover_s}s")
    where = f"\n{o}\n{rig.logs()}"
    assert o.written >= 10, f"too little load{where}"
    assert not o.vanished, f"inserts answered success but not in the table: {o.vanished}{where}"
    assert o.total_lost == 0, f"lost: { {k: v[:20] for k, v in o.lost.items() if v} }{where}"
    assert not any(o.phantom.values()), f"uncommitted rows delivered: {o.phantom}{where}"
    # Realtime: exactly once per subscriber (resume by cursor, no replay).
    assert all(v == 0 for k, v in o.duplicated.items() if k != "webhook"), f"duplicates {o.duplicated}{where}"
    # Webhooks: at least once, and a repeat carries the same webhook-id.
    assert not o.foreign_ids, f"rows delivered under two webhook-ids: {o.foreign_ids}{where}"
    assert "500" not in o.statuses, f"the API answered 500: {dict(o.statuses)}{where}"
    assert o.recover_s is not None, f"no consumer got a row written after the restart{where}"


async def test_realtime_killed(rig: Rig) -> None:
    o = await rig.phase("realtime")
    check(rig, o)
    assert not o.statuses, "the API is not affected by a realtime crash"
    assert all(s.reconnects >= 1 for s in rig.subs)


async def test_worker_killed(rig: Rig) -> None:
    o = await rig.phase("worker")
    check(rig, o)
    assert not o.statuses


async def test_api_killed(rig: Rig) -> None:
    o = await rig.phase("api")
    check(rig, o)
    assert o.statuses, "some writes must have failed while the API was down"
    assert o.api_recover_s is not None


async def test_postgres_stopped_immediately(rig: Rig) -> None:
    o = await rig.phase("postgres")
    check(rig, o)
    # While PostgreSQL was down the API answered 503 (DATABASE_CONNECTION_ERROR), never 500,
    # and it came back without a restart of its own.
    assert o.statuses.get("503", 0) >= 1, dict(o.statuses)
    assert set(o.statuses) <= {"503"}, dict(o.statuses)
    assert o.api_recover_s is not None and rig.procs["api"].poll() is None


@pytest.mark.timeout(300)  # run alone (-k), it also starts the rig; weed mini restarts in ~10 s
async def test_s3_killed_during_uploads(rig: Rig) -> None:
    o = await rig.storage_phase()
    OUTCOMES.append(o)
    detail = rig.storage_detail
    print(f"\n{table([o])}\nfailed calls: {dict(o.statuses)}; {detail}; api back after {o.api_recover_s}s")
    where = f"\n{o}\n{detail}\n{rig.logs()}"
    assert o.confirmed >= 5, f"too little load{where}"
    assert o.statuses.get("503", 0) >= 1, f"no upload met the outage{where}"
    # Uploads and confirmations met 503 STORAGE_UNAVAILABLE while S3 was down, never a 500.
    assert set(o.statuses) <= {"503"}, f"answers besides 503: {dict(o.statuses)}{where}"
    assert set(detail["codes"]) <= {"STORAGE_UNAVAILABLE"}, where
    assert not o.vanished, f"uploads answered success without a file: {o.vanished}{where}"
    assert o.total_lost == 0, f"file rows without their object: {o.lost}{where}"
    assert o.total_duplicated == 0, f"objects no row accounts for: {detail['unaccounted']}{where}"
    assert detail["pending rows"] == 0, where
    assert o.api_recover_s is not None and o.recover_s is not None, f"no upload after the restart{where}"
    assert rig.procs["api"].poll() is None, "the API recovered without a restart of its own"
