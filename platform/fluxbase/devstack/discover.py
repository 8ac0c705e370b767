"""Finding a running `fluxbase dev` from the CLI, so its commands need no variables set by hand.

`fluxbase dev` keeps its data in `.fluxbase/` of the checkout (or FLUXBASE_DEV_DIR) and, while it
runs, writes `dev-env.json` there (mode 600): its pid and the environment it gave its services.
A CLI command run anywhere inside the checkout looks for that folder upwards from the current
directory and uses the stack when its supervisor is alive.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEV_DIR = ".fluxbase"
ENV_FILE = "dev-env.json"
CREDENTIALS_FILE = "dev-credentials.json"


class NoDevStack(Exception):
    """`--dev` was given but no running `fluxbase dev` was found; the message says what to do."""


@dataclass(frozen=True)
class DevStack:
    """A running dev stack: its folder, the services' environment and the first-run credentials."""

    path: Path
    env: dict[str, str]
    credentials: dict[str, Any]

    @property
    def api_url(self) -> str:
        return str(self.credentials.get("apiUrl") or "")


def dev_dir(environ: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """FLUXBASE_DEV_DIR, else the nearest `.fluxbase/` folder at or above cwd that holds a stack."""
    if environ.get("FLUXBASE_DEV_DIR"):
        return Path(environ["FLUXBASE_DEV_DIR"]).resolve()
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DEV_DIR
        if (candidate / "dev-secret-key").exists() or (candidate / ENV_FILE).exists():
            return candidate
    return None


def _alive(pid: Any) -> bool:
    """A live `fluxbase dev` process (not merely some live pid: pid 1 is always alive)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self").exists():
        return True  # no procfs (macOS): the file's owner and mode are the check
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"fluxbase" in a for a in args) and b"dev" in args


def _private(path: Path) -> bool:
    """Written by this user's own `fluxbase dev` (mode 600, a file, not a link): a dev-env.json
    that came with a cloned checkout, or that another user can write, is not trusted (it names
    the database and the secret every command would use; hostile review 4)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def find(environ: Mapping[str, str], *, required: bool, cwd: Path | None = None) -> DevStack | None:
    """The running dev stack for this directory, or None (NoDevStack when `required`)."""
    folder = dev_dir(environ, cwd)
    if folder is None:
        if required:
            raise NoDevStack(
                "--dev: no .fluxbase/ folder here or above. Run the command inside the Fluxbase "
                "checkout where `make run` (fluxbase dev) is running."
            )
        return None
    try:
        if not (_private(folder / ENV_FILE) and _private(folder / CREDENTIALS_FILE)):
            raise ValueError("not this user's own private files")
        state = json.loads((folder / ENV_FILE).read_text())
        credentials = json.loads((folder / CREDENTIALS_FILE).read_text())
    except (OSError, ValueError):
        state, credentials = None, None
    if not isinstance(state, dict) or not isinstance(credentials, dict) or not _alive(state.get("pid")):
        if required:
            raise NoDevStack(f"the dev stack in {folder} is not running: start it with `make run`.")
        return None
    env = {str(k): str(v) for k, v in dict(state.get("env") or {}).items()}
    return DevStack(folder, env, credentials)


def hint(environ: Mapping[str, str], cwd: Path | None = None) -> str | None:
    """What to say instead of "set these variables" when this checkout has a dev stack."""
    folder = dev_dir(environ, cwd)
    if folder is None:
        return None
    return (
        f"This checkout has a dev stack in {folder}: start it with `make run` and run the command "
        "again inside the checkout (or with --dev); it then finds the database, the secret and the "
        "keys by itself. Do not generate a new FLUXBASE_SECRET_KEY for it: the tenant passwords "
        "are derived from the one it has."
    )
