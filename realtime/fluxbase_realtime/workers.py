"""Several realtime processes on one port: a supervisor and its workers (SO_REUSEPORT).

One Python process tops out at one core; `fluxbase realtime --workers N` (or
`FLUXBASE_REALTIME_WORKERS`) starts N worker processes that each bind the same host and port
with SO_REUSEPORT, so the kernel spreads new connections over them. Each worker is a whole
realtime service, exactly like a replica on another host: its own outbox reader (commit-safe
cursor, doorbell registration), RLS gate, credential re-validation and presence, which is shared
through PostgreSQL; a subscriber therefore receives every event once from the worker that holds
its socket, and presence is the same whichever worker a socket landed on.

The supervisor serves nothing itself. It restarts a worker that dies (its sockets are gone; their
clients reconnect and resume with `since`), and on SIGTERM/SIGINT stops the workers, each
closing its sockets and leaving its presence, then exits. `/metrics` answers for the worker that
took the scrape's connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("fluxbase.realtime.workers")

RESTART_DELAY_S = 1.0  # a worker that keeps dying at start is not restarted in a tight loop
STOP_WITHIN_S = 15.0  # after SIGTERM, a worker still running is killed


def worker_command(host: str, port: int, loop: str) -> list[str]:
    """The command line of one worker: the realtime service, bound with SO_REUSEPORT."""
    return [
        *(sys.executable, "-m", "fluxbase", "realtime", "--host", host, "--port", str(port)),
        *("--reuse-port", "--loop", loop),
    ]


def supervise(host: str, port: int, workers: int, loop: str = "auto") -> int:
    """Run `workers` realtime processes on `host:port` until SIGTERM/SIGINT; returns the exit code."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    env = dict(os.environ, FLUXBASE_REALTIME_WORKERS="1")
    procs: list[subprocess.Popen[bytes] | None] = [None] * workers
    started_at = [0.0] * workers
    try:
        while not stopping:
            for i, proc in enumerate(procs):
                if proc is not None and proc.poll() is None:
                    continue
                if proc is not None:
                    log.warning(
                        "realtime worker %d (pid %d) exited with %s; restarting", i, proc.pid, proc.returncode
                    )
                if time.monotonic() - started_at[i] < RESTART_DELAY_S:
                    continue
                started_at[i] = time.monotonic()
                started = procs[i] = subprocess.Popen(
                    worker_command(host, port, loop), env=env, stdin=subprocess.DEVNULL
                )
                log.info("realtime worker %d started (pid %d) on %s:%d", i, started.pid, host, port)
            time.sleep(0.2)
    finally:
        live = [p for p in procs if p is not None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN_S
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("realtime worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.wait()
    return 0
