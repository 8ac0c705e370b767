"""Chaos: kill each process mid-load and count what every consumer got (issue 18).

One invocation starts an embedded PostgreSQL and S3, a Fluxbase API, realtime service and
webhook worker as separate processes, --subscribers realtime clients resuming by cursor and an
aiohttp webhook endpoint, with --writers writers inserting numbered rows through
/api/execute-sql at --rate rows/s in all. It runs a baseline phase without a fault, then one
phase per target: SIGKILL (PostgreSQL: an immediate stop), --down seconds down, restart. It
prints the table: process killed, rows written (committed, from the table), delivered (the
fewest distinct rows any consumer got), lost, duplicated (deliveries beyond the first, summed
over consumers: webhooks are at least once), recover_s: the seconds from the restart until every
consumer got a row written after it (its ratio against the baseline phase, which measures plain
delivery latency on this machine, is printed below the table), and start_s: the part of it the
restarted process took to be ready (a Python process start on a loaded machine dominates).

The s3 phase kills `weed mini` under upload load instead (streamed through the API and
presigned POSTs straight to S3), then runs housekeeping: written = file rows, delivered = rows
whose object is there with their size, lost = rows without it or uploads answered success
without a row, duplicated = objects no row accounts for; recover_s = restart until an upload
succeeds again.

    .venv/bin/python bench/chaos.py [--rate 10] [--writers 3] [--subscribers 2] [--down 1.5]
        [--targets realtime,worker,api,postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from chaossupport import TARGETS, Outcome, Rig, table  # noqa: E402
from support import start_stack, stop_stack  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-chaos-"))
    stack = start_stack(tmp, durable=True)  # acknowledged commits survive an immediate stop
    rig = Rig(stack, tmp, writers=args.writers, rate=args.rate, subscribers=args.subscribers)
    outcomes: list[Outcome] = []
    try:
        await rig.start()
        for target in ["none", *args.targets.split(",")]:
            if target == "s3":  # uploads through the API and presigned POSTs, then housekeeping
                o = await rig.storage_phase(before_s=args.before, down_s=args.down, after_s=args.after)
            else:
                o = await rig.phase(target, before_s=args.before, down_s=args.down, after_s=args.after)
            outcomes.append(o)
            print(
                f"{target}: {o.confirmed} {'uploads' if target == 's3' else 'inserts'} answered success, "
                f"{o.written} {'file rows' if target == 's3' else 'committed'}; "
                f"failed writes {dict(o.statuses)}, api back after "
                f"{o.api_recover_s if o.api_recover_s is None else round(o.api_recover_s, 2)} s, "
                f"phantoms {sum(len(v) for v in o.phantom.values())}, duplicates {o.duplicated}, "
                f"two webhook-ids for one row {len(o.foreign_ids)}",
                flush=True,
            )
    finally:
        await rig.close()
        stop_stack(stack)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(outcomes))
    base = outcomes[0].recover_s if outcomes else None
    if base:
        print()
        for o in outcomes[1:]:
            if o.recover_s is not None and o.killed != "s3":
                print(
                    f"{o.killed}: recovery {o.recover_s / base:.1f}x the no-fault delivery latency ({base:.2f} s)"
                )
    print(f"\nload: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    bad = any(o.total_lost or any(o.phantom.values()) or o.vanished for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=10.0, help="rows per second, all writers together")
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--subscribers", type=int, default=2)
    p.add_argument("--before", type=float, default=2.0, help="seconds of load before the kill")
    p.add_argument("--down", type=float, default=1.5, help="seconds the process stays down")
    p.add_argument("--after", type=float, default=3.0, help="seconds of load after the restart")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    sys.exit(asyncio.run(main(p.parse_args())))
