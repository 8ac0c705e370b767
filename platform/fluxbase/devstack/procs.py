"""Child-process helpers: free ports, clear port-in-use errors, children that die with their parent."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


class PortInUse(Exception):
    """A port we must listen on is taken; the message says which and how to change it."""


class Interrupted(KeyboardInterrupt):
    """A stop was requested (SIGINT/SIGTERM) while starting or waiting.

    A KeyboardInterrupt on purpose: asyncio re-raises it out of callbacks and tasks instead of
    logging it away, and `except Exception` clean-up paths let it through to the supervisor.
    """


StopCheck = Callable[[], bool]


# Under pytest-xdist (`make test` runs the suite in parallel workers) each worker, and every process
# it starts, inherits PYTEST_XDIST_WORKER=gw<N> and PYTEST_XDIST_WORKER_COUNT. A port is picked
# here and bound later by a child: two workers asking the kernel (bind to port 0) could be handed
# the same port in that gap. Each worker therefore takes ports from its own block below the
# kernel's ephemeral range (32768 up on Linux, where outgoing connections take their local ports),
# walking the block from a random start so consecutive picks of one process always differ.
_BLOCKS_FROM, _BLOCKS_TO = 20_000, 32_768
_cursor: list[int] = []


def _worker_block() -> tuple[int, int] | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    try:
        count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        return None
    size = (_BLOCKS_TO - _BLOCKS_FROM) // count
    start = _BLOCKS_FROM + (int(worker[2:]) % count) * size
    return start, start + size


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1", *, below: int | None = None) -> int:
    """A port nobody is listening on; with `below`, one under that bound (from 20000 up).

    In a pytest-xdist worker, one from that worker's own block (see above)."""
    block = _worker_block()
    if block is not None and (below is None or below > block[0]):
        lo, hi = block
        hi = min(hi, below) if below is not None else hi
        if not _cursor:
            _cursor.append(random.randrange(lo, hi))
        for _ in range(hi - lo):
            port = lo + (_cursor[0] - lo) % (hi - lo)
            _cursor[0] = port + 1
            if _bindable(host, port):
                return port
        raise RuntimeError(f"no free port in {lo}-{hi}")
    if below is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randrange(20_000, below)
        if _bindable(host, port):
            return port
    raise RuntimeError(f"no free port below {below}")


def ensure_port_free(host: str, port: int, what: str, env_var: str) -> None:
    """Raise PortInUse with a helpful message when host:port is already bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise PortInUse(
                f"Port {port} on {host} is already in use, so the {what} cannot start. "
                f"Stop whatever is listening there or choose another port with {env_var}=<port>."
            ) from None


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn that makes the kernel SIGTERM the child when its parent dies (Linux)."""

    def _apply() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
        os.setpgrp()  # own process group: a terminal's Ctrl-C reaches only the supervisor

    return _apply


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal a child, wait for it, and kill it if it will not go."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    should_stop: StopCheck | None = None,
) -> None:
    """Block until something accepts TCP connections on host:port (or a stop is requested)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if should_stop is not None and should_stop():
            raise Interrupted()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")
