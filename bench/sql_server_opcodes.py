"""The Python work of one /api/execute-sql request *including the HTTP server's*: bytecodes and
in-process time per request, served by uvicorn with its plain httptools protocol (the ASGI path:
RequestLog → SqlFastPath) and with `fluxbase.http.protocol.SqlHttpProtocol` (`fluxbase api`).

bench/sql_opcodes.py drives the ASGI app directly and leaves the server out; here a real uvicorn
`Server` (uvloop, httptools) listens on 127.0.0.1 in this process and a raw keep-alive client in
the same process sends the benchmark's point SELECT, one request at a time. The client's own
frames are not counted; its time is in the µs figure for both sides alike. Load on the machine
does not move the bytecode counts.

    .venv/bin/python bench/sql_server_opcodes.py [--rounds 3] [--requests 1000]
        [--protocol-only] [--by-function 40]   # where the bytecodes of one request go
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PROTOCOLS = {
    "ASGI (uvicorn httptools)": "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol",
    "protocol (fluxbase api)": "fluxbase.http.protocol:SqlHttpProtocol",
}


async def _child(
    body: bytes, key: str, requests: int, http: str, by_function: int = 0, by_line: bool = False
) -> dict[str, Any]:
    import uvicorn

    from fluxbase.devstack.procs import free_port

    port = free_port()
    config = uvicorn.Config(
        "fluxbase.http.asgi:create_from_env",
        factory=True,
        host="127.0.0.1",
        port=port,
        http=http,
        loop="none",
        log_level="error",
        access_log=False,
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    raw = (
        f"POST /api/execute-sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    last = b""

    async def one() -> None:
        nonlocal last
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        last = await reader.readexactly(length)

    for _ in range(500):  # warm-up: pools, prepared statements, caches
        await one()
    assert b'"Alice"' in last, last
    per_request = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(requests):
            await one()
        per_request.append((time.perf_counter() - t0) / requests * 1e6)
    count = 0
    here = os.path.abspath(__file__)
    per_function: collections.Counter[str] = collections.Counter()

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "opcode":
            count += 1
            if by_function:
                code = frame.f_code
                where = f":{frame.f_lineno}" if by_line else ""
                per_function[f"{code.co_qualname} ({os.path.basename(code.co_filename)}{where})"] += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == here:
            return None  # the client
        frame.f_trace_opcodes = True
        return local

    traced = 200
    sys.settrace(tracer)
    try:
        for _ in range(traced):
            await one()
    finally:
        sys.settrace(None)
    assert b'"Alice"' in last, last
    writer.close()
    server.should_exit = True
    await serving
    top = [(name, n / traced) for name, n in per_function.most_common(by_function)]
    return {"us_per_request": min(per_request), "opcodes_per_request": count / traced, "top": top}


async def _parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from sql_opcodes import _setup

    from support import start_stack, stop_stack

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-server-opcodes-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        env = stack.env(dbname, FLUXBASE_RATE_LIMIT_REQUESTS="100000000", FLUXBASE_LOG_LEVEL="error")
        body, key = _setup(env, tmp)
        protocols = {k: v for k, v in PROTOCOLS.items() if not args.protocol_only or "fluxbase api" in k}
        got: dict[str, list[dict[str, Any]]] = {k: [] for k in protocols}
        for n in range(args.rounds):
            for name in list(protocols) if n % 2 == 0 else list(reversed(protocols)):
                proc = await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "--requests",
                        str(args.requests),
                        "--http",
                        protocols[name],
                        "--by-function",
                        str(args.by_function),
                        *(["--by-line"] if args.by_line else []),
                    ],
                    input=json.dumps({"body": body.decode(), "key": key}).encode(),
                    env=env,
                    capture_output=True,
                    check=True,
                )
                result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
                got[name].append(result)
                print(
                    f"round {n} {name:<26} {result['opcodes_per_request']:8.0f} bytecodes/request  "
                    f"{result['us_per_request']:6.1f} µs/request (sequential, client in-process)"
                )
                for fn, ops in result["top"]:
                    print(f"    {ops:7.1f}  {fn}")
        med = {
            name: (
                statistics.median(r["opcodes_per_request"] for r in rs),
                statistics.median(r["us_per_request"] for r in rs),
            )
            for name, rs in got.items()
        }
        print()
        for name, (ops, us) in med.items():
            print(f"{name:<26} {ops:8.0f} bytecodes/request, {us:6.1f} µs/request")
        if len(med) == 2:
            (a_ops, a_us), (b_ops, b_us) = med.values()
            print(f"protocol/ASGI: bytecodes {b_ops / a_ops:.3f}, time {b_us / a_us:.3f}")
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument(
        "--by-function", type=int, default=0, help="print the N functions with the most bytecodes"
    )
    ap.add_argument("--by-line", action="store_true", help="--by-function counts per source line")
    ap.add_argument("--protocol-only", action="store_true", help="measure only `fluxbase api`'s protocol")
    ap.add_argument("--http", default=PROTOCOLS["protocol (fluxbase api)"], help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import uvloop

        spec = json.loads(sys.stdin.read())
        result = uvloop.run(
            _child(
                spec["body"].encode(), spec["key"], args.requests, args.http, args.by_function, args.by_line
            )
        )
        print(json.dumps(result))
        return
    asyncio.run(_parent(args))


if __name__ == "__main__":
    main()
