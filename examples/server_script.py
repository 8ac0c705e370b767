"""A server-side Python script with the Fluxbase client: schema, data, a batch, storage, realtime.

    FLUXBASE_URL=http://127.0.0.1:8080 FLUXBASE_REALTIME_URL=ws://127.0.0.1:8081 \
    FLUXBASE_PROJECT_ID=<id> FLUXBASE_API_KEY=<admin key> python examples/server_script.py [--events N]

Prints what it does; with --events N it waits for N live events on `orders` and prints them
(insert rows from anywhere meanwhile), resuming across disconnects without loss or repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from fluxbase_client import AsyncFluxbase, SqlError


async def main(events: int) -> None:
    async with AsyncFluxbase(
        os.environ["FLUXBASE_URL"],
        os.environ["FLUXBASE_PROJECT_ID"],
        os.environ["FLUXBASE_API_KEY"],
        realtime_url=os.environ.get("FLUXBASE_REALTIME_URL"),
    ) as fx:
        await fx.sql(
            "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, customer_id int, amount numeric, "
            "status text DEFAULT 'pending')"
        )
        # All or nothing: both rows or neither.
        await fx.batch(
            [
                ("INSERT INTO orders (customer_id, amount) VALUES ($1, $2)", [7, "59.99"]),
                ("INSERT INTO orders (customer_id, amount) VALUES ($1, $2)", [8, "12.50"]),
            ]
        )
        pending = await fx.table("orders").eq("status", "pending").order("id", desc=True).limit(5).get()
        print("pending orders:", [(o["id"], o["amount"]) for o in pending])
        try:
            await fx.sql("SELECT * FROM ordrs")
        except SqlError as exc:
            print("as expected:", exc.code, exc.sqlstate, exc.message)

        if "invoices" not in [b["name"] for b in await fx.storage.list_buckets()]:
            await fx.storage.create_bucket("invoices")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "invoice-1.txt"
            path.write_text("Invoice 1: 59.99\n")
            f = await fx.storage.upload("invoices", path, upsert=True)
        print("uploaded", f["s3_key"], "download:", (await fx.storage.download_url(f["s3_key"]))[:60], "...")

        if events:
            async with fx.realtime() as rt:
                channel = await rt.subscribe(tables=["orders"])
                print(f"listening for {events} events on orders (cursor {channel.cursor})", flush=True)
                seen = 0
                async for ev in channel:
                    if ev["type"] == "db_event":
                        print(ev["payload"]["operation"], ev["payload"]["record"], flush=True)
                        seen += 1
                    elif ev["type"] == "resync_required":
                        print("missed too much: reload your state", flush=True)
                    if seen >= events:
                        break


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=0)
    asyncio.run(main(ap.parse_args().events))
