"""Several realtime processes on one port: a supervisor and its workers (SO_REUSEPORT).

One Python process tops out at one core; `fluxbase realtime --workers N` (or
`FLUXBASE_REALTIME_WORKERS`) starts N worker processes that each bind the same host and port
with SO_REUSEPORT, so the kernel spreads new connections over them. Each worker is a whole
realtime service, exactly like a replica on another host: its own outbox reader (commit-safe
cursor, doorbell registration), RLS gate, credential re-validation and presence, which is shared
through PostgreSQL; a subscriber therefore receives every event once from the worker that holds
its socket, and presence is the same whichever worker a socket landed on.

The supervisor serves nothing itself. It restarts a worker that dies (its sockets are gone; their
clients reconnect and resume with `since`), and on SIGTERM/SIGINT/SIGHUP stops the workers, each
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
from dataclasses import dataclass

from fluxbase.devstack.procs import die_with_parent

log = logging.getLogger("fluxbase.realtime.workers")

RESTART_DELAY_S = 1.0  # a worker that keeps dying at start is not restarted in a tight loop
EARLY_EXIT_S = 30.0  # a worker that exits this soon after its start failed to start
MAX_FAILED_STARTS = 5  # in a row: then the configuration is wrong (port, database); give up
STOP_WITHIN_S = 15.0  # after SIGTERM, a worker still running is killed


def worker_command(host: str, port: int, loop: str) -> list[str]:
    """The command line of one worker: the realtime service, bound with SO_REUSEPORT."""
    return [
        *(sys.executable, "-m", "fluxbase", "realtime", "--host", host, "--port", str(port)),
        *("--reuse-port", "--loop", loop),
    ]


@dataclass
class _Slot:
    """One worker place: its current process, when it started, when its last one ended."""

    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float = float("-inf")


def supervise(host: str, port: int, workers: int, loop: str = "asyncio") -> int:
    """Run `workers` realtime processes on `host:port` until SIGTERM/SIGINT/SIGHUP; returns the exit code
    (1 when workers keep failing to start: the port or the database is wrong)."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    env = dict(os.environ, FLUXBASE_REALTIME_WORKERS="1")
    slots = [_Slot() for _ in range(workers)]
    failed_starts = 0
    code = 0
    try:
        while not stopping:
            for i, slot in enumerate(slots):
                now = time.monotonic()
                if slot.proc is not None:
                    if slot.proc.poll() is None:
                        continue
                    log.warning(
                        "realtime worker %d (pid %d) exited with %s", i, slot.proc.pid, slot.proc.returncode
                    )
                    failed_starts = failed_starts + 1 if now - slot.started < EARLY_EXIT_S else 0
                    slot.proc, slot.ended = None, now
                    if failed_starts >= MAX_FAILED_STARTS:
                        log.error("realtime workers keep failing to start; stopping")
                        code, stopping = 1, True
                        break
                if now - slot.ended < RESTART_DELAY_S:
                    continue
                # die_with_parent: a supervisor that dies without its `finally` (SIGKILL, the
                # OOM killer) takes its workers along instead of leaving them on the port.
                slot.proc = subprocess.Popen(
                    worker_command(host, port, loop),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent(),
                )
                slot.started = now
                log.info("realtime worker %d started (pid %d) on %s:%d", i, slot.proc.pid, host, port)
            time.sleep(0.2)
    finally:
        live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
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
    return code
