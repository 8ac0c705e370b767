"""`fluxbase dev` end to end: a real supervisor process, its printed curl line, and clean shutdown.

Each test runs `python -m fluxbase dev` as a subprocess with its own data directory and free
ports, and checks afterwards that no PostgreSQL or SeaweedFS process of that directory (nor any
process the supervisor started) is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dashboard_support import http_sign_in
from fluxbase.devstack.procs import free_port
from support import ROOT, bearer

STARTED_LINE = "Ctrl-C stops everything."
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
CREDENTIAL_KEYS = {"email", "password", "projectId", "apiKey", "apiUrl", "realtimeUrl"}


@dataclass
class DevSetup:
    """A data directory and the ports `fluxbase dev` uses with it."""

    path: Path
    api_port: int
    rt_port: int
    pg_port: int
    s3_port: int
    smtp_port: int
    mail_port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def rt_http_url(self) -> str:
        return f"http://127.0.0.1:{self.rt_port}"

    @property
    def credentials_path(self) -> Path:
        return self.path / "dev-credentials.json"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXBASE_")}
        env.update(
            FLUXBASE_DEV_DIR=str(self.path),
            FLUXBASE_API_PORT=str(self.api_port),
            FLUXBASE_REALTIME_PORT=str(self.rt_port),
            FLUXBASE_DEV_PG_PORT=str(self.pg_port),
            FLUXBASE_DEV_S3_PORT=str(self.s3_port),
            FLUXBASE_DEV_SMTP_PORT=str(self.smtp_port),
            FLUXBASE_DEV_MAIL_PORT=str(self.mail_port),
        )
        return env

    def credentials(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.credentials_path.read_text())
        return data


def new_setup(path: Path) -> DevSetup:
    return DevSetup(
        path, free_port(), free_port(), free_port(), free_port(below=55_000), free_port(), free_port()
    )


@pytest.fixture(scope="module")
def dev_setup(tmp_path_factory: pytest.TempPathFactory) -> DevSetup:
    """One data directory shared by the first-start and restart tests."""
    return new_setup(tmp_path_factory.mktemp("devstack") / "data")


class DevProcess:
    """A running `fluxbase dev` supervisor whose output goes to a log file."""

    def __init__(self, setup: DevSetup, log_path: Path):
        self.setup = setup
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fluxbase", "dev"],
                env=setup.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        self.tracked: dict[int, psutil.Process] = {}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, *patterns: str, timeout: float = 15) -> str:
        """The output once every regex in `patterns` is in it: a request's line is relayed through
        the supervisor after its response has reached the client, so it can lag that response."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            missing = [p for p in patterns if not re.search(p, out)]
            if not missing:
                return out
            if time.monotonic() > deadline:
                pytest.fail(f"{missing[0]!r} not in the output after {timeout:.0f}s:\n{out[-3000:]}")
            time.sleep(0.1)

    def track(self) -> None:
        """Remember every descendant (postmaster and its workers, weed, api, realtime, worker)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.tracked.setdefault(child.pid, child)

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if STARTED_LINE in self.output():
                self.track()
                return
            if self.proc.poll() is not None:
                pytest.fail(
                    f"fluxbase dev exited with {self.proc.returncode} during startup:\n{self.output()}"
                )
            time.sleep(0.2)
        pytest.fail(f"fluxbase dev did not finish starting in {START_TIMEOUT:.0f}s:\n{self.output()[-4000:]}")

    def curl_line(self) -> str:
        lines = [line.strip() for line in self.output().splitlines() if line.strip().startswith("curl ")]
        assert len(lines) == 1, self.output()
        return lines[0]

    def stop(self, sig: signal.Signals) -> int:
        """Send sig and return the exit code; fail if it takes longer than STOP_TIMEOUT."""
        self.track()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"fluxbase dev did not exit within {STOP_TIMEOUT:.0f}s of {sig.name}:\n{self.output()}"
            )

    def force_cleanup(self) -> None:
        """After a failed test: make sure nothing we started outlives it."""
        if self.proc.poll() is None:
            self.track()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for p in self.tracked.values():
            with contextlib.suppress(psutil.Error):
                p.kill()


@contextlib.contextmanager
def running_dev(setup: DevSetup, log_path: Path) -> Iterator[DevProcess]:
    dev = DevProcess(setup, log_path)
    try:
        dev.wait_started()
        yield dev
    finally:
        dev.force_cleanup()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(data_dir: Path, tracked: dict[int, psutil.Process] | None = None) -> list[str]:
    """Processes still alive: anything the supervisor started, or postgres/weed of data_dir."""
    found = {p.pid: " ".join(p.cmdline()) for p in (tracked or {}).values() if _alive(p)}
    marker = str(data_dir) + os.sep
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and ("postgres" in cmdline or "weed" in cmdline) and _alive(p):
            found[p.pid] = cmdline
    return [f"{pid}: {cmd}" for pid, cmd in sorted(found.items())]


def wait_no_leftovers(data_dir: Path, tracked: dict[int, psutil.Process]) -> None:
    # The supervisor waits for its children, so this should hold at once; allow a moment for
    # the kernel to finish reaping the postmaster's workers.
    deadline = time.monotonic() + 5
    while (left := leftovers(data_dir, tracked)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes left behind:\n" + "\n".join(left)


def run_printed_curl(dev: DevProcess) -> dict[str, Any]:
    """Run the printed curl line exactly as a user would paste it into a shell."""
    res = subprocess.run(["bash", "-c", dev.curl_line()], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    body: dict[str, Any] = json.loads(res.stdout)
    return body


def wait_caught(url: str, to: str, timeout: float = 30) -> dict[str, Any]:
    """The catcher's first message to `to` (the worker is another process: poll its endpoint)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = httpx.get(url, params={"to": to}, timeout=10).json()["messages"]
        if messages:
            return dict(messages[0])
        assert time.monotonic() < deadline, f"no message to {to} at {url}"
        time.sleep(0.2)


def test_first_start_prints_working_curl_and_sigint_stops_everything(
    dev_setup: DevSetup, tmp_path: Path
) -> None:
    with running_dev(dev_setup, tmp_path / "dev-first.log") as dev:
        creds_path = dev_setup.credentials_path
        assert creds_path.exists()
        assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
        creds = dev_setup.credentials()
        assert set(creds) >= CREDENTIAL_KEYS, creds
        assert creds["apiUrl"] == dev_setup.api_url
        assert creds["realtimeUrl"] == f"ws://127.0.0.1:{dev_setup.rt_port}"
        assert creds["apiKey"].startswith("flx_live_")
        assert creds["apiKey"] in dev.curl_line()

        for url in (dev_setup.api_url, dev_setup.rt_http_url):
            r = httpx.get(f"{url}/ready", timeout=10)
            assert r.status_code == 200, (url, r.text)

        body = run_printed_curl(dev)
        assert body["success"] is True, body
        assert body["result"]["columns"] == ["server_time"], body
        assert body["result"]["rowCount"] == 1, body

        # The dashboard's URL is printed, and the saved credentials sign in to it.
        assert f"Dashboard   {dev_setup.api_url}/dashboard/" in dev.output()
        with httpx.Client(timeout=10) as browser:
            r = http_sign_in(browser, dev_setup.api_url, creds["email"], creds["password"])
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/", r.text
            assert "My first project" in browser.get(f"{dev_setup.api_url}/dashboard/").text

        # Mail goes to the local catcher, readable where the supervisor says.
        mail_url = f"http://127.0.0.1:{dev_setup.mail_port}/messages"
        assert mail_url in dev.output()
        r = httpx.post(f"{dev_setup.api_url}/api/auth/recover", json={"email": creds["email"]}, timeout=10)
        assert r.status_code == 202, r.text
        assert "Reset your Fluxbase password" in wait_caught(mail_url, creds["email"])["subject"]

        # Something written at runtime, to find again after a restart: a read key minted by the
        # admin key (an admin key may mint read/readwrite keys for its own project).
        r = httpx.post(
            f"{dev_setup.api_url}/api/projects/{creds['projectId']}/api-keys",
            json={"name": "survives restart", "scope": "read"},
            headers=bearer(creds["apiKey"]),
        )
        assert r.status_code == 201, r.text
        (dev_setup.path.parent / "read-key").write_text(r.json()["key"])

        assert dev.stop(signal.SIGINT) == 0, dev.output()
        assert "Traceback" not in dev.output()
    wait_no_leftovers(dev_setup.path, dev.tracked)
    ports = (dev_setup.api_port, dev_setup.rt_port, dev_setup.pg_port, dev_setup.s3_port, dev_setup.smtp_port)
    for port in (*ports, dev_setup.mail_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


def test_restart_reuses_credentials_keeps_data_and_sigterm_stops_everything(
    dev_setup: DevSetup, tmp_path: Path
) -> None:
    read_key_path = dev_setup.path.parent / "read-key"
    if not dev_setup.credentials_path.exists():  # run on its own: make the first start here
        with running_dev(dev_setup, tmp_path / "dev-setup.log") as dev:
            creds = dev_setup.credentials()
            r = httpx.post(
                f"{dev_setup.api_url}/api/projects/{creds['projectId']}/api-keys",
                json={"name": "survives restart", "scope": "read"},
                headers=bearer(creds["apiKey"]),
            )
            assert r.status_code == 201, r.text
            read_key_path.write_text(r.json()["key"])
            assert dev.stop(signal.SIGTERM) == 0, dev.output()
    before = dev_setup.credentials()

    with running_dev(dev_setup, tmp_path / "dev-restart.log") as dev:
        after = dev_setup.credentials()
        assert after == before
        assert stat.S_IMODE(dev_setup.credentials_path.stat().st_mode) == 0o600
        assert "migrations  applied" not in dev.output()  # nothing new to apply on a restart
        assert before["apiKey"] in dev.curl_line()

        api = dev_setup.api_url
        r = httpx.get(
            f"{api}/api/projects/{before['projectId']}", headers=bearer(before["apiKey"]), timeout=10
        )
        assert r.status_code == 200, r.text
        assert r.json()["project"]["id"] == before["projectId"]
        r = httpx.get(
            f"{api}/api/projects/{before['projectId']}", headers=bearer(read_key_path.read_text()), timeout=10
        )
        assert r.status_code == 200, r.text
        r = httpx.post(
            f"{api}/api/auth/login",
            json={"email": before["email"], "password": before["password"]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{dev_setup.rt_http_url}/ready", timeout=10).status_code == 200

        body = run_printed_curl(dev)
        assert body["success"] is True, body

        assert dev.stop(signal.SIGTERM) == 0, dev.output()
        assert "Traceback" not in dev.output()
    wait_no_leftovers(dev_setup.path, dev.tracked)


@pytest.mark.parametrize(
    "taken",
    [
        "FLUXBASE_API_PORT",
        "FLUXBASE_REALTIME_PORT",
        "FLUXBASE_DEV_PG_PORT",
        "FLUXBASE_DEV_S3_PORT",
        "FLUXBASE_DEV_SMTP_PORT",
        "FLUXBASE_DEV_MAIL_PORT",
    ],
)
def test_port_in_use_gives_a_clear_message_and_starts_nothing(tmp_path: Path, taken: str) -> None:
    setup = new_setup(tmp_path / "data")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = setup.env()
        env[taken] = str(port)
        res = subprocess.run(
            [sys.executable, "-m", "fluxbase", "dev"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    output = res.stdout + res.stderr
    assert res.returncode == 2, output
    assert f"Port {port}" in res.stderr and taken in res.stderr, output
    assert "Traceback" not in output
    assert leftovers(setup.path) == []
    assert not setup.path.exists()  # the port check runs before anything is created


_PICK_PORTS = """
import json
import socket

from fluxbase.devstack.procs import free_port
picks = [free_port() for _ in range(6)] + [free_port(below=55_000) for _ in range(3)]
with socket.socket() as held:  # a port in use is never handed out
    held.bind(("127.0.0.1", picks[-1] + 1))
    picks.append(free_port())
print(json.dumps(picks))
"""


@pytest.mark.parametrize(("worker", "block"), [("gw0", (20_000, 26_384)), ("gw1", (26_384, 32_768))])
def test_parallel_test_workers_pick_ports_from_their_own_blocks(worker: str, block: tuple[int, int]) -> None:
    """Under pytest-xdist two workers (and their children) pick ports while children bind earlier
    picks: each worker takes them from its own block below the ephemeral range, never twice in a
    row, never one that is taken."""
    env = {**os.environ, "PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": "2"}
    out = subprocess.run(
        [sys.executable, "-c", _PICK_PORTS], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    picks = json.loads(out)
    assert all(block[0] <= p < block[1] for p in picks), picks
    assert len(set(picks)) == len(picks), picks
    assert picks[-1] != picks[-2] + 1, picks  # the held port was skipped
