"""What an end-user token costs on /api/execute-sql, next to a key that names the user itself.

One invocation: starts an embedded PostgreSQL and S3, a Fluxbase API (allowed to fetch a JWKS
from loopback), a local JWKS server, and a project whose table has an owner-rows RLS policy.
Then, with a read key and the same point SELECT, at the given client counts:
  * authUid:    the key names the end user in the body (the trusted-server baseline),
  * own token:  a Fluxbase project user's access token (signature + one session lookup),
  * HS256:      an external token checked with the project's jwtSecret (one settings lookup),
  * RS256 JWKS: an external token checked with a cached JWKS key (one settings lookup).
Prints req/s, p50/p99 and each ratio to the baseline (which runs first and again last).

    .venv/bin/python bench/user_tokens.py [--seconds 6] [--clients 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from sql_throughput import http_load, post  # noqa: E402

from fluxbase.devstack.procs import free_port  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

QUERY = "SELECT body FROM notes WHERE id = $1"


@contextlib.contextmanager
def jwks_server(jwks: dict[str, object]) -> Iterator[str]:
    body = json.dumps(jwks).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--workers", type=int, default=1, help="API worker processes")
    ap.add_argument("--clients", default="8")
    args = ap.parse_args()

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "k1", "use": "sig"}
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(port),
            FLUXBASE_API_WORKERS=str(args.workers),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
            FLUXBASE_ENDUSER_JWKS_ALLOW_PRIVATE="true",
        )
        with jwks_server({"keys": [jwk]}) as jwks_uri, run_service(["api"], env, port, tmp) as server:
            api = httpx.Client(base_url=server.url, timeout=30)
            email = f"bench-{secrets.token_hex(4)}@example.com"
            api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
            token = api.post("/api/auth/login", json={"email": email, "password": "bench password 1"}).json()[
                "token"
            ]
            h = {"Authorization": f"Bearer {token}"}
            pid = api.post("/api/projects", json={"name": "bench"}, headers=h).json()["project"]["id"]
            admin, ro = (
                api.post(f"/api/projects/{pid}/api-keys", json={"name": s, "scope": s}, headers=h).json()[
                    "key"
                ]
                for s in ("admin", "read")
            )
            secret = secrets.token_urlsafe(64)
            r = api.patch(
                f"/api/projects/{pid}/auth/settings",
                json={"jwtSecret": secret, "jwksUri": jwks_uri},
                headers=h,
            )
            assert r.status_code == 200, r.text
            api.post(
                f"/api/projects/{pid}/auth/register", json={"email": email, "password": "bench password 1"}
            )
            login = api.post(
                f"/api/projects/{pid}/auth/login", json={"email": email, "password": "bench password 1"}
            ).json()
            own_uid, own_token = login["user"]["id"], login["accessToken"]
            exp = int(time.time()) + 3600
            hs = jwt.encode({"sub": "ext-hs", "exp": exp}, secret, algorithm="HS256")
            rs = jwt.encode({"sub": "ext-rs", "exp": exp}, rsa_key, algorithm="RS256", headers={"kid": "k1"})
            for q in (
                "CREATE TABLE notes (id int, owner text, body text)",
                f"INSERT INTO notes VALUES (1, 'srv-user', 'hello'), (1, '{own_uid}', 'hello'), "
                "(1, 'ext-hs', 'hello'), (1, 'ext-rs', 'hello'), (1, 'someone-else', 'secret')",
                "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
                "CREATE POLICY own ON notes USING (owner = auth.uid())",
            ):
                r = api.post(
                    "/api/execute-sql",
                    json={"projectId": pid, "query": q},
                    headers={"Authorization": f"Bearer {admin}"},
                )
                assert r.json()["success"], r.text
            plain = json.dumps({"projectId": pid, "query": QUERY, "params": [1]}).encode()
            with_uid = json.dumps(
                {"projectId": pid, "query": QUERY, "params": [1], "authUid": "srv-user"}
            ).encode()
            key_h = {"Authorization": f"Bearer {ro}"}
            scenarios = [
                ("authUid", post("/api/execute-sql", port, with_uid, key_h)),
                (
                    "own token",
                    post("/api/execute-sql", port, plain, {**key_h, "X-Fluxbase-User-Token": own_token}),
                ),
                ("HS256", post("/api/execute-sql", port, plain, {**key_h, "X-Fluxbase-User-Token": hs})),
                ("RS256 JWKS", post("/api/execute-sql", port, plain, {**key_h, "X-Fluxbase-User-Token": rs})),
            ]
            # The baseline runs first and last, so drift on a shared machine shows in its two figures.
            scenarios.append(("authUid again", scenarios[0][1]))
            # Each scenario must see exactly its own row (RLS), or the numbers mean nothing.
            check = b'"rows":[{"body":"hello"}]'
            print(
                f"\nPoint SELECT under RLS, read key, {args.seconds:.0f}s per run, "
                f"API workers={args.workers}, cores={os.cpu_count()}"
            )
            for clients in (int(c) for c in args.clients.split(",")):
                base = None
                for name, request in scenarios:
                    await http_load("127.0.0.1", port, request, clients, 1.0, check)  # warm-up
                    res = await http_load("127.0.0.1", port, request, clients, args.seconds, check)
                    res.name = name
                    base = base or res
                    print(f"{res.line()}   {res.rps / base.rps:6.1%} of authUid")
            api.close()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
