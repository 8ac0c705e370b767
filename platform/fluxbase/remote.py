"""CLI commands that talk to a running Fluxbase API over HTTP: migrations push, export, import.

They take `--url`/`--key` or FLUXBASE_URL/FLUXBASE_KEY (a project API key or a dashboard session
token), else use the running `fluxbase dev` of the checkout they are run in (devstack.discover),
print what they did on stdout and progress on stderr, and turn an error envelope into
`fluxbase: CODE: message` with exit code 1. The key never appears in their output.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from fluxbase.devstack import discover
from fluxbase.security import apikeys

MIGRATION_FILE = re.compile(r"^(\d+)_[A-Za-z0-9_.-]+\.sql$")


class RemoteError(Exception):
    """The API answered with an error envelope (or could not be reached)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class Progress:
    """A byte counter on stderr: a bar when the total is known, a running count otherwise."""

    def __init__(self, label: str, total: int | None, out: TextIO = sys.stderr):
        self.label, self.total, self.out = label, total, out
        self.done = 0
        self._last = 0.0
        self._tty = out.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= (0.1 if self._tty else 1.0):
            self._last = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        mib = self.done / (1024 * 1024)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {frac * 100:5.1f}% {mib:.1f} MiB"
        else:
            text = f"{self.label} {mib:.1f} MiB"
        self.out.write(("\r" if self._tty else "") + text + (end if self._tty else "\n"))
        self.out.flush()

    def close(self) -> None:
        self._draw("\n")


def connection(args: Any, *, session: bool = False) -> tuple[str, str]:
    """API URL and credential: --url/--key, else FLUXBASE_URL/FLUXBASE_KEY, else the running dev
    stack of this checkout: its admin key for its first project, a dashboard session of its
    admin for `session` commands and for the admin's other projects (an imported copy)."""
    url = args.url or os.environ.get("FLUXBASE_URL") or ""
    key = args.key or os.environ.get("FLUXBASE_KEY") or ""
    want = bool(getattr(args, "dev", False))
    if want or not url or not key:
        stack = discover.find(os.environ, required=want)
        if stack is not None:
            url = url or stack.api_url
            project = getattr(args, "project", None)
            if session or (project and project != stack.credentials.get("projectId")):
                key = key or _dev_session(stack)
            else:
                key = key or str(stack.credentials.get("apiKey") or "")
    if not url or not key:
        raise RemoteError(
            "VALIDATION_ERROR",
            "set --url and --key (or FLUXBASE_URL and FLUXBASE_KEY), or run the command inside a "
            "checkout whose `make run` (fluxbase dev) is running",
        )
    return url.rstrip("/"), key


def _dev_session(stack: discover.DevStack) -> str:
    """A dashboard session token of the dev stack's admin (import needs a session, not a key)."""
    creds = stack.credentials
    r = httpx.post(
        f"{stack.api_url}/api/auth/login",
        json={"email": creds.get("email"), "password": creds.get("password")},
        timeout=30,
    )
    _raise_for(r)
    return str(r.json()["token"])


def _raise_for(r: httpx.Response) -> None:
    if r.is_success:
        return
    try:
        err = r.json()["error"]
        raise RemoteError(str(err.get("code")), str(err.get("message")))
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"HTTP_{r.status_code}", r.text[:200]) from None


def migration_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.is_file() and MIGRATION_FILE.match(p.name)]
    return sorted(files, key=lambda p: (int(MIGRATION_FILE.match(p.name).group(1)), p.name))  # type: ignore[union-attr]


def push_migrations(args: Any, out: TextIO = sys.stdout) -> int:
    url, key = connection(args)
    directory = Path(args.dir)
    if not directory.is_dir():
        raise RemoteError("VALIDATION_ERROR", f"{directory} is not a directory")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        for path in migration_files(directory):
            name = path.name.removesuffix(".sql")
            r = client.post(
                f"/api/projects/{args.project}/migrations", json={"name": name, "sql": path.read_text()}
            )
            _raise_for(r)
            print(("applied " if r.json()["applied"] else "skipped ") + name, file=out, flush=True)
    return 0


def export_project(args: Any) -> int:
    url, key = connection(args)
    target = Path(args.output)
    tmp = target.with_name(target.name + ".partial")
    progress = Progress("export", None)
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client,
        client.stream("GET", f"/api/projects/{args.project}/export") as r,
    ):
        if not r.is_success:
            r.read()
            _raise_for(r)
        last = b""
        with tmp.open("wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
                last = (last + chunk)[-200:]
                progress.update(len(chunk))
    progress.close()
    if b"-- fluxbase-export-end sha256=" not in last:
        tmp.unlink(missing_ok=True)
        raise RemoteError("EXPORT_INCOMPLETE", "the server ended the export early; nothing was written")
    tmp.replace(target)
    print(f"exported project {args.project} to {target} ({target.stat().st_size} bytes)")
    return 0


def _chunks(path: Path, progress: Progress) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(256 * 1024):
            progress.update(len(chunk))
            yield chunk


def import_project(args: Any) -> int:
    url, key = connection(args, session=True)
    path = Path(args.file)
    size = path.stat().st_size
    params = {"name": args.name} if args.name else {}
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30, read=3600)
    ) as client:
        # The credential is checked before the upload: a dump can be gigabytes, and the server
        # can only refuse a wrong one after reading the whole body.
        if apikeys.looks_like_key(key):
            raise RemoteError(
                "AUTH_REQUIRED",
                "import creates a project, so it needs a dashboard session token (POST /api/auth/login), "
                "not an API key",
            )
        _raise_for(client.get("/api/auth/me"))
        progress = Progress("import", size)
        r = client.post(
            "/api/projects/import",
            params=params,
            content=_chunks(path, progress),
            headers={"Content-Type": "application/sql"},
        )
    progress.close()
    _raise_for(r)
    project = r.json()["project"]
    print(f"imported {path} into new project {project['id']} ({project['name']})")
    return 0
