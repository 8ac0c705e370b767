"""docs/tutorial.md, run block by block against a fresh `fluxbase dev`, and what the dev stack does for
a newcomer (issue 25): a readwrite key, a CLI that finds the stack, one terminal line per request.

The stack runs in a "checkout" folder inside a private (0700) folder, as a clone under /root
would be; the tutorial's shell blocks run with bash in that folder (their exported variables carried
from block to block), its Python blocks are exec'd in one namespace (like one `python3` session
started from that shell), its JavaScript blocks run with node. An `output` block lists lines the
block before it must print.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxbase.http.requestlog import RequestLog
from support import ROOT, bearer
from test_dev_command import DevProcess, DevSetup, new_setup, running_dev

TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK_RE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
RUNNABLE = ("sh", "python", "js")


@dataclass
class Block:
    lang: str
    code: str
    expected: list[str]
    line: int


def tutorial_blocks() -> list[Block]:
    text = TUTORIAL.read_text()
    blocks: list[Block] = []
    for m in BLOCK_RE.finditer(text):
        lang, code = m.group(1), m.group(2)
        if lang == "output":
            assert blocks, "an output block must follow a runnable block"
            blocks[-1].expected.extend(line.strip() for line in code.splitlines() if line.strip())
        elif lang in RUNNABLE:
            blocks.append(Block(lang, code, [], text[: m.start()].count("\n") + 1))
    return blocks


@dataclass
class Dev:
    setup: DevSetup
    proc: DevProcess
    checkout: Path

    def base_env(self) -> dict[str, str]:
        """A newcomer's shell: no FLUXBASE_* variables, the virtualenv's bin first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXBASE_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    private = tmp_path_factory.mktemp("home")
    private.chmod(0o700)  # like /root: other users cannot enter it
    checkout = private / "checkout"
    checkout.mkdir()
    setup = new_setup(checkout / ".fluxbase")
    with running_dev(setup, private / "dev.log") as proc:
        yield Dev(setup, proc, checkout)


def _run_shell(code: str, env: dict[str, str], cwd: Path) -> tuple[str, dict[str, str]]:
    state = cwd / ".tutorial-env"
    script = f"set -eo pipefail\n{code}\nenv -0 > {state}\n"
    res = subprocess.run(
        ["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    carried = dict(item.split("=", 1) for item in state.read_text().split("\0") if "=" in item)
    state.unlink()
    return res.stdout + res.stderr, carried


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run_python(code: str, namespace: dict[str, Any], env: dict[str, str], cwd: Path) -> str:
    out = io.StringIO()
    with _environment(env), contextlib.chdir(cwd), contextlib.redirect_stdout(out):
        exec(compile(code, str(TUTORIAL), "exec"), namespace)  # noqa: S102 - the tutorial's own code
    return out.getvalue()


def _run_js(code: str, env: dict[str, str], cwd: Path) -> str:
    node = shutil.which("node")
    assert node, "node is required for the tutorial's JavaScript blocks"
    major = int(
        subprocess.run([node, "--version"], capture_output=True, text=True).stdout.lstrip("v").split(".")[0]
    )
    script = cwd / "subscriber.mjs"
    script.write_text(code)
    args = [node, *(["--experimental-websocket"] if major < 22 else []), str(script)]
    res = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_every_tutorial_block_runs_in_order(dev: Dev) -> None:
    blocks = tutorial_blocks()
    assert {b.lang for b in blocks} == set(RUNNABLE), "the tutorial shows shell, Python and JavaScript"
    env = dev.base_env()
    namespace: dict[str, Any] = {"__name__": "__tutorial__"}
    for block in blocks:
        if block.lang == "sh":
            output, env = _run_shell(block.code, env, dev.checkout)
        elif block.lang == "python":
            output = _run_python(block.code, namespace, env, dev.checkout)
        else:
            output = _run_js(block.code, env, dev.checkout)
        for line in block.expected:
            assert line in output, f"docs/tutorial.md line {block.line}: {line!r} not in:\n{output}"
    assert "Traceback" not in dev.proc.output()


# -- what `make run` hands a newcomer -----------------------------------------------------------


def test_dev_stack_hands_out_a_readwrite_key(dev: Dev) -> None:
    creds = dev.setup.credentials()
    assert creds["readwriteKey"].startswith("flx_live_") and creds["readwriteKey"] != creds["apiKey"]
    out = dev.proc.output()
    assert creds["readwriteKey"] in out and "bypasses RLS" in out
    r = httpx.get(
        f"{creds['apiUrl']}/api/projects/{creds['projectId']}/api-keys", headers=bearer(creds["apiKey"])
    )
    scopes = {k["name"]: k["scope"] for k in r.json()["apiKeys"]}
    assert scopes["dev readwrite key"] == "readwrite"
    # The folder above the checkout was private; the stack reached it with o+x only (finding 8).
    mode = stat.S_IMODE(dev.checkout.parent.stat().st_mode)
    assert mode == 0o701, oct(mode)


def _cli(dev: Dev, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxbase", *args],
        env=dev.base_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_finds_the_dev_stack_from_inside_the_checkout(dev: Dev, tmp_path: Path) -> None:
    pid = dev.setup.credentials()["projectId"]
    sub = dev.checkout / "src" / "deep"
    sub.mkdir(parents=True)
    res = _cli(dev, "create-key", "--project", pid, "--scope", "read", cwd=sub)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["scope"] == "read"
    res = _cli(dev, "migrate", "--dev", cwd=dev.checkout)
    assert res.returncode == 0 and "applied 0 migration(s)" in res.stdout, res.stderr

    # Outside any checkout: told what is missing; --dev says where to run it.
    res = _cli(dev, "create-key", "--project", pid, "--dev", cwd=tmp_path)
    assert res.returncode == 2 and "make run" in res.stderr, res.stderr
    # A checkout whose stack is not running: never "generate a new secret", but how to reach it.
    stopped = tmp_path / "other-checkout"
    (stopped / ".fluxbase").mkdir(parents=True)
    (stopped / ".fluxbase" / "dev-secret-key").write_text("x" * 64)
    res = _cli(dev, "create-key", "--project", pid, cwd=stopped)
    assert res.returncode == 2, res.stderr
    assert "secrets.token_urlsafe" not in res.stderr and "Generate" not in res.stderr
    assert "make run" in res.stderr and "Do not generate a new FLUXBASE_SECRET_KEY" in res.stderr


def test_dev_terminal_shows_each_request_and_every_error_with_its_id(dev: Dev) -> None:
    creds = dev.setup.credentials()
    api, pid = creds["apiUrl"], creds["projectId"]
    ok = httpx.post(
        f"{api}/api/execute-sql",
        json={"projectId": pid, "query": "SELECT 1"},
        headers=bearer(creds["readwriteKey"]),
    )
    bad = httpx.get(f"{api}/api/projects/{pid}", headers=bearer("flx_live_" + "x" * 43))
    sql_error = httpx.post(
        f"{api}/api/execute-sql",
        json={"projectId": pid, "query": "SELECT * FROM nosuch"},
        headers=bearer(creds["readwriteKey"]),
    )
    assert ok.status_code == 200 and bad.status_code == 401 and sql_error.json()["success"] is False
    line = r"\d+ms project=" + pid
    out = dev.proc.wait_output(
        rf"POST /api/execute-sql 200 {line} {ok.headers['x-request-id']}\n",
        rf"GET /api/projects/{pid} 401 {line} {bad.headers['x-request-id']} AUTH_REQUIRED: ",
        rf"POST /api/execute-sql 200 {line} {sql_error.headers['x-request-id']} SQL_EXEC_ERROR: "
        r'relation "nosuch" does not exist',
    )
    assert "\033[" not in out  # not a terminal: no colour codes in a log file
    assert "flx_live_xxxx" not in out  # credentials never reach the terminal


async def test_request_lines_are_coloured_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send(
            {"type": "http.response.body", "body": b'{"success":false,"error":{"code":"X","message":"m"}}'}
        )

    out = Tty()
    scope = {"type": "http", "method": "GET", "path": "/api/projects/0123456789abcdef", "query_string": b""}
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await RequestLog(app, out)(scope, receive, send)
    line = out.getvalue()
    assert "\033[31m503\033[0m" in line and "project=0123456789abcdef" in line and "X: m" in line
    assert (b"x-request-id", scope["fluxbase.request_id"].encode()) in sent[0]["headers"]


def test_every_taken_port_is_named_in_one_run(tmp_path: Path) -> None:
    setup = new_setup(tmp_path / "data")
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        env = setup.env()
        env["FLUXBASE_API_PORT"] = str(a.getsockname()[1])
        env["FLUXBASE_DEV_PG_PORT"] = str(b.getsockname()[1])
        res = subprocess.run(
            [sys.executable, "-m", "fluxbase", "dev"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert res.returncode == 2, res.stderr
    assert "FLUXBASE_API_PORT" in res.stderr and "FLUXBASE_DEV_PG_PORT" in res.stderr, res.stderr
    assert not setup.path.exists()
