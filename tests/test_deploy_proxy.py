"""The compose stack's reverse proxy (infra/proxy/) in front of a real API and realtime service:
requests and a realtime WebSocket pass through it, over plain HTTP without a certificate and over
TLS with one. Runs where nginx is installed (Debian: `apt-get install nginx-light`); Docker's DNS
names, ports and folders are replaced by local ones, the routes and headers are the shipped ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from fluxbase.devstack.procs import free_port, stop_process, wait_for_port
from support import bearer, run_service

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")

PROXY = Path(__file__).resolve().parent.parent / "infra" / "proxy"


@contextlib.contextmanager
def nginx(tmp: Path, api_port: int, rt_port: int, tls: bool) -> Iterator[tuple[str, str]]:
    """The proxy as the entrypoint script configures it; yields (http URL, https URL or '')."""
    conf, certs, src = tmp / "conf.d", tmp / "tls", tmp / "proxy"
    for d in (conf, certs, src):
        d.mkdir()
    if tls:
        subj = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
        out = ["-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.crt")]
        cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subj, *out]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    env = dict(os.environ, FLUXBASE_PROXY_SRC=str(PROXY), FLUXBASE_PROXY_CONF=str(conf))
    env["FLUXBASE_PROXY_TLS"] = str(certs)
    subprocess.run(["sh", str(PROXY / "40-fluxbase-proxy.sh")], env=env, check=True, timeout=10)
    banner = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10).stderr
    old = tuple(map(int, re.findall(r"nginx/(\d+)\.(\d+)", banner)[0])) < (1, 25)
    http_port, https_port, health_port = free_port(), free_port(), free_port()
    for f in PROXY.glob("*.conf"):
        shutil.copy(f, src / f.name)
    for f in [*conf.iterdir(), *src.iterdir()]:
        text = (
            f.read_text()
            .replace("/etc/fluxbase/proxy/", f"{src}/")
            .replace("/etc/fluxbase/tls/", f"{certs}/")
        )
        text = text.replace("server api:8080 resolve;", f"server 127.0.0.1:{api_port};")
        text = text.replace("server realtime:8081 resolve;", f"server 127.0.0.1:{rt_port};")
        text = text.replace("resolver 127.0.0.11 valid=10s ipv6=off;", "")
        text = text.replace("listen 80 default_server;", f"listen 127.0.0.1:{http_port} default_server;")
        text = text.replace(
            "listen 443 ssl default_server;", f"listen 127.0.0.1:{https_port} ssl default_server;"
        )
        text = text.replace("listen 127.0.0.1:8099;", f"listen 127.0.0.1:{health_port};")
        f.write_text(text.replace("    http2 on;\n", "") if old else text)
    temp = "".join(
        f"{k}_temp_path {tmp}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp / "nginx.conf"
    main.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        + f"http {{\naccess_log off;\n{temp}include {conf}/*.conf;\n}}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(main), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port("127.0.0.1", health_port, timeout=15)
        assert httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=5).text == "ok\n"
        yield f"http://127.0.0.1:{http_port}", (f"https://127.0.0.1:{https_port}" if tls else "")
    finally:
        stop_process(proc, signal.SIGQUIT, timeout=10)
        print((tmp / "error.log").read_text(errors="replace")[-2000:] if (tmp / "error.log").exists() else "")


@pytest.fixture(scope="module")
def realtime_port(instance, log_dir) -> Iterator[int]:
    port = free_port()
    with run_service(["realtime"], dict(instance.env, FLUXBASE_REALTIME_PORT=str(port)), port, log_dir):
        yield port


async def _through(base: str, ws_base: str, key: str, pid: str, ctx: ssl.SSLContext | None) -> None:
    async with httpx.AsyncClient(base_url=base, verify=ctx or True, timeout=20) as http:
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["postgres"] == "ok"
        assert (await http.get("/metrics")).status_code == 404  # closed at the proxy
        sql = {
            "projectId": pid,
            "query": "CREATE TABLE IF NOT EXISTS via_proxy (id serial PRIMARY KEY, v text)",
        }
        r = await http.post("/api/execute-sql", json=sql, headers=bearer(key))
        assert r.json()["success"], r.text
        async with connect(f"{ws_base}/realtime?token={key}", ssl=ctx) as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
                pass
            insert = {"projectId": pid, "query": "INSERT INTO via_proxy (v) VALUES ('through nginx')"}
            r = await http.post("/api/execute-sql", json=insert, headers=bearer(key))
            assert r.json()["success"], r.text
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "db_event":
                    break
            assert msg["payload"]["table"] == "via_proxy"
            assert msg["payload"]["record"]["v"] == "through nginx"


async def test_requests_and_a_websocket_pass_through_the_plain_proxy(
    tmp_path, instance, realtime_port, project
) -> None:
    api_port = int(instance.url.rsplit(":", 1)[1])
    with nginx(tmp_path, api_port, realtime_port, tls=False) as (http_url, _):
        await _through(http_url, http_url.replace("http", "ws", 1), project.admin_key, project.id, None)


async def test_the_proxy_terminates_tls_and_redirects_plain_http(
    tmp_path, instance, realtime_port, project
) -> None:
    api_port = int(instance.url.rsplit(":", 1)[1])
    with nginx(tmp_path, api_port, realtime_port, tls=True) as (http_url, https_url):
        ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "tls.crt"))
        async with httpx.AsyncClient(timeout=10) as http:
            plain = await http.get(f"{http_url}/ready")
        assert plain.status_code == 308 and plain.headers["location"].startswith("https://127.0.0.1/ready")
        await _through(https_url, https_url.replace("https", "wss", 1), project.admin_key, project.id, ctx)
