"""What a Python HTTP server costs per request before any work: a hello-world answer.

One invocation serves the same constant JSON body with each server found, in turn, `--rounds`
times (so load from elsewhere on the machine falls on all of them alike), under `wrk` (one
thread, keep-alive GETs) at each client count, and prints req/s, the server's CPU per request
(its process tree, from /proc/<pid>/stat) and the ratio of that CPU to uvicorn's:

  * uvicorn: the ASGI app on uvicorn with httptools and uvloop, as `fluxbase api` runs it,
  * granian-asgi and granian-rsgi: the same on granian 2 (Rust HTTP, one worker; RSGI is its own
    interface: the body is read and the answer written with one call each), when installed,
  * socketify: socketify.py (uWebSockets) with an async handler, when installed.

granian and socketify are not Fluxbase dependencies: `.venv/bin/pip install granian socketify`
first. Issue 24 asked whether a faster server than uvicorn moves the floor under
/api/execute-sql; benchmarks.md has the answer.

    .venv/bin/python bench/http_floor.py [--clients 8,32] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BODY = b'{"rows":[{"id":1,"name":"Alice","email":"alice@example.com"}]}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
_RSGI_HEADERS = [("content-type", "application/json")]
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})


class _Rsgi:
    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        await proto()
        proto.response_bytes(200, _RSGI_HEADERS, BODY)


rsgi = _Rsgi()


def serve_socketify(port: int) -> None:
    from socketify import App, AppListenOptions  # type: ignore[import-not-found]  # not a dependency

    app = App()

    async def hello(res: Any, req: Any) -> None:
        res.write_header("content-type", "application/json")
        res.end(BODY)

    app.get("/", hello)
    # (a bare port would bind every interface)
    app.listen(AppListenOptions(port=port, host="127.0.0.1"), lambda config: None)
    app.run()


def commands(port: int) -> dict[str, list[str]]:
    py = sys.executable
    uvicorn = [py, "-m", "uvicorn", "http_floor:asgi", "--port", str(port), "--host", "127.0.0.1"]
    uvicorn += ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log"]
    out = {"uvicorn": uvicorn}
    if importlib.util.find_spec("granian") is not None:
        for iface, app in (("asgi", "http_floor:asgi"), ("rsgi", "http_floor:rsgi")):
            out[f"granian-{iface}"] = [py, "-m", "granian", app, "--interface", iface, "--host", "127.0.0.1"]
            out[f"granian-{iface}"] += [
                "--port",
                str(port),
                "--workers",
                "1",
                "--no-ws",
                "--log-level",
                "warning",
            ]
    if importlib.util.find_spec("socketify") is not None:
        out["socketify"] = [py, str(Path(__file__)), "--serve-socketify", str(port)]
    return out


def tree_ticks(root: int) -> int:
    """utime + stime of a process and its descendants, in clock ticks."""
    total = 0
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
        todo += children.get(pid, [])
    return total


def wait_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def measure(cmd: list[str], port: int, clients: int, seconds: float) -> tuple[float, float]:
    """(req/s, server CPU µs per request) of one wrk run after a one-second warm-up."""
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc)
        url = f"http://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", f"-c{clients}", "-d1s", url], capture_output=True, check=True)
        t0 = tree_ticks(proc.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", url],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        t1 = tree_ticks(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    found = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if found is None or "Non-2xx" in out:
        raise SystemExit(f"wrk: no clean result:\n{out}")
    requests = int(found.group(1))
    elapsed = float(found.group(2)) / (1000 if found.group(3) == "ms" else 1)
    return requests / elapsed, (t1 - t0) / CLK_TCK / requests * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--serve-socketify", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_socketify:
        serve_socketify(args.serve_socketify)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    sys.path.insert(0, str(HERE.parent / "platform"))
    from fluxbase.devstack.procs import free_port

    port = args.port or free_port()
    servers = commands(port)
    print(
        f"hello-world floor, {args.seconds:.0f}s per run, {args.rounds} rounds, servers: {', '.join(servers)}"
    )
    for clients in [int(c) for c in args.clients.split(",")]:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, cmd in servers.items():
                runs[name].append(measure(cmd, port, clients, args.seconds))
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(f"\n-- {clients} clients (load average {load}); medians of {args.rounds} rounds")
        base = sorted(cpu for _, cpu in runs["uvicorn"])[len(runs["uvicorn"]) // 2]
        for name, results in runs.items():
            rps = sorted(r for r, _ in results)[len(results) // 2]
            cpu = sorted(c for _, c in results)[len(results) // 2]
            each = " ".join(f"{c:.1f}" for _, c in results)
            print(
                f"{name:<14} {rps:8.0f} req/s   server CPU {cpu:5.1f} us/req ({each})   "
                f"CPU / uvicorn's {cpu / base:.2f}"
            )


if __name__ == "__main__":
    main()
