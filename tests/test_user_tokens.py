"""End-user tokens on /api/execute-sql: own and external (HS secret, JWKS) tokens, every refusal,
requireUserAuth keys, and the reference doc's four RLS patterns driven by end-user tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from websockets.asyncio.client import connect

from fluxbase.devstack.procs import free_port
from support import Api, assert_clean, assert_error, bearer, random_ip, run_service

PASSWORD = "correct horse battery"
MANY = 1_000_000


# -- a real JWKS server --------------------------------------------------------------------------


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    url: str = ""


@contextlib.contextmanager
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def public_jwk(private: Any, kid: str) -> dict[str, Any]:
    pub = private.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def claims(sub: str, **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 600, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token PyJWT would refuse to produce: alg none, or HMAC keyed with a public key."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = b64(hmac.new(key, signing.encode(), hashlib.sha256).digest()) if key is not None else ""
    return f"{signing}.{sig}"


# -- helpers ----------------------------------------------------------------------------------------


async def run(api: Api, key: str, pid: str, q: str, token: str | None = None, **extra: Any) -> httpx.Response:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    return await api.http.post(
        "/api/execute-sql", json={"projectId": pid, "query": q, **extra}, headers=headers
    )


async def rows(api: Api, key: str, pid: str, q: str, token: str | None = None, **extra: Any) -> list[dict]:
    r = await run(api, key, pid, q, token, **extra)
    assert r.status_code == 200 and r.json()["success"], r.text
    return list(r.json()["result"]["rows"])


async def project_user_token(api: Api, pid: str, email: str | None = None) -> tuple[str, str]:
    """Register and log in a project user; return (user id, access token)."""
    email = email or f"u-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"/api/projects/{pid}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/api/projects/{pid}/auth/login",
        json={"email": email, "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    return r.json()["user"]["id"], r.json()["accessToken"]


async def configure(api: Api, owner_token: str, pid: str, **settings: Any) -> None:
    r = await api.http.patch(f"/api/projects/{pid}/auth/settings", json=settings, headers=bearer(owner_token))
    assert r.status_code == 200, r.text


@dataclass
class JwksProject:
    api: Api
    pid: str
    owner_token: str
    admin_key: str
    ro: str
    jwks: JwksServer
    rsa_key: Any
    ec_key: Any
    ed_key: Any


@pytest.fixture(scope="module")
async def jwks_env(spawn) -> AsyncIterator[JwksProject]:
    """An instance that may fetch JWKS from loopback, with a 1 s refetch floor, and a project
    trusting a local JWKS server with an RSA, an EC and an Ed25519 key."""
    with jwks_server() as server:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        ed_key = ed25519.Ed25519PrivateKey.generate()
        server.keys = [public_jwk(rsa_key, "rsa1"), public_jwk(ec_key, "ec1"), public_jwk(ed_key, "ed1")]
        async with spawn(
            FLUXBASE_OUTBOUND_ALLOW_NETWORKS="127.0.0.1/32", FLUXBASE_ENDUSER_JWKS_MIN_REFRESH_SECONDS="1"
        ) as inst:
            api = Api(inst.url)
            try:
                await api.register()  # the instance admin
                _, token = await api.new_user()
                pid = await api.new_project(token)
                admin = await api.new_key(token, pid, "admin", rateLimitRequests=MANY)
                ro = await api.new_key(token, pid, "read", rateLimitRequests=MANY)
                await configure(
                    api,
                    token,
                    pid,
                    jwksUri=server.url,
                    jwtAllowedIssuers=["https://idp.example.com/"],
                    jwtExpectedAudiences=["my-app"],
                )
                yield JwksProject(api, pid, token, admin, ro, server, rsa_key, ec_key, ed_key)
            finally:
                await api.close()


def idp(sub: str, **extra: Any) -> dict[str, Any]:
    return claims(sub, iss="https://idp.example.com/", aud="my-app", **extra)


# -- identity sources ------------------------------------------------------------------------------


async def test_own_token_sets_uid_and_claims(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read", rateLimitRequests=MANY)
    uid, token = await project_user_token(api, project.id, "own@example.com")
    got = await rows(
        api, ro, project.id, "SELECT auth.uid() AS uid, auth.jwt() AS jwt, auth.role() AS role", token
    )
    assert got[0]["uid"] == uid and got[0]["role"] == "read"
    assert got[0]["jwt"]["email"] == "own@example.com" and got[0]["jwt"]["aud"] == project.id
    # Dashboard sessions may carry a user token too.
    got = await rows(api, project.owner_token, project.id, "SELECT auth.uid() AS uid", token)
    assert got == [{"uid": uid}]
    # Without a token nothing changed: authUid from a trusted server still works.
    assert await rows(api, ro, project.id, "SELECT auth.uid() AS uid", authUid="srv") == [{"uid": "srv"}]
    # authUid may not contradict the token (the same value is fine).
    assert_error(
        await run(api, ro, project.id, "SELECT 1", token, authUid="someone-else"), 400, "VALIDATION_ERROR"
    )
    assert await rows(api, ro, project.id, "SELECT auth.uid() AS uid", token, authUid=uid) == [{"uid": uid}]


async def test_external_hs_tokens(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read", rateLimitRequests=MANY)
    secret = secrets.token_urlsafe(64)
    pid = project.id
    await configure(api, project.owner_token, pid, jwtSecret=secret)
    for alg in ("HS256", "HS384", "HS512"):
        tok = jwt.encode(claims("ext-1", role="authenticated", org="acme"), secret, algorithm=alg)
        got = await rows(api, ro, pid, "SELECT auth.uid() AS uid, auth.jwt()->>'org' AS org", tok)
        assert got == [{"uid": "ext-1", "org": "acme"}]
    # iss/aud are checked once configured.
    await configure(
        api, project.owner_token, pid, jwtAllowedIssuers=["https://a.example/"], jwtExpectedAudiences=["app"]
    )
    good = jwt.encode(claims("ext-2", iss="https://a.example/", aud="app"), secret, algorithm="HS256")
    assert await rows(api, ro, pid, "SELECT auth.uid() AS uid", good) == [{"uid": "ext-2"}]
    wrong_iss = jwt.encode(claims("x", iss="https://evil.example/", aud="app"), secret, algorithm="HS256")
    body = assert_error(await run(api, ro, pid, "SELECT 1", wrong_iss), 401, "INVALID_USER_TOKEN")
    assert "iss" in body["error"]["message"]
    wrong_aud = jwt.encode(claims("x", iss="https://a.example/", aud="other"), secret, algorithm="HS256")
    body = assert_error(await run(api, ro, pid, "SELECT 1", wrong_aud), 401, "INVALID_USER_TOKEN")
    assert "aud" in body["error"]["message"]
    no_aud = jwt.encode(claims("x", iss="https://a.example/"), secret, algorithm="HS256")
    assert_error(await run(api, ro, pid, "SELECT 1", no_aud), 401, "INVALID_USER_TOKEN")
    expired = jwt.encode(
        {**claims("x", iss="https://a.example/", aud="app"), "exp": int(time.time()) - 120},
        secret,
        algorithm="HS256",
    )
    assert_error(await run(api, ro, pid, "SELECT 1", expired), 401, "TOKEN_EXPIRED")
    no_exp = jwt.encode({"sub": "x", "iss": "https://a.example/", "aud": "app"}, secret, algorithm="HS256")
    body = assert_error(await run(api, ro, pid, "SELECT 1", no_exp), 401, "INVALID_USER_TOKEN")
    assert "exp" in body["error"]["message"]
    bad_sig = jwt.encode(
        claims("x", iss="https://a.example/", aud="app"), "another-secret-" * 3, algorithm="HS256"
    )
    body = assert_error(await run(api, ro, pid, "SELECT 1", bad_sig), 401, "INVALID_USER_TOKEN")
    assert "signature" in body["error"]["message"]
    none = hand_made({"alg": "none", "typ": "JWT"}, claims("x", iss="https://a.example/", aud="app"), None)
    body = assert_error(await run(api, ro, pid, "SELECT 1", none), 401, "INVALID_USER_TOKEN")
    assert "none" in body["error"]["message"]
    for junk in ("garbage", "a.b.c", "x" * 20_000):
        assert_error(await run(api, ro, pid, "SELECT 1", junk), 401, "INVALID_USER_TOKEN")
    # A token forged for an own-token shape (iss fluxbase) but signed with the project's secret.
    fake_own = jwt.encode(claims("x", iss="fluxbase", aud=pid, sid="pus_x"), secret, algorithm="HS256")
    assert_error(await run(api, ro, pid, "SELECT 1", fake_own), 401, "INVALID_USER_TOKEN")
    # Nothing about the secret leaks.
    assert_clean(await run(api, ro, pid, "SELECT 1", bad_sig), secret)
    # Rotating the secret ends tokens signed with the old one at once (verified tokens are
    # remembered briefly, but a settings change forgets them).
    await configure(api, project.owner_token, pid, jwtSecret=secrets.token_urlsafe(64))
    assert_error(await run(api, ro, pid, "SELECT 1", good), 401, "INVALID_USER_TOKEN")


async def test_jwks_tokens_all_key_types(jwks_env: JwksProject) -> None:
    e = jwks_env
    cases = [
        (e.rsa_key, "RS256", "rsa1"),
        (e.rsa_key, "RS512", "rsa1"),
        (e.rsa_key, "PS256", "rsa1"),
        (e.ec_key, "ES256", "ec1"),
        (e.ed_key, "EdDSA", "ed1"),
    ]
    for key, alg, kid in cases:
        tok = jwt.encode(idp(f"user-{alg}"), key, algorithm=alg, headers={"kid": kid})
        assert await rows(e.api, e.ro, e.pid, "SELECT auth.uid() AS uid", tok) == [{"uid": f"user-{alg}"}], (
            alg
        )
    # The key type pins the algorithm: an EC key cannot verify an RS256 token.
    tok = jwt.encode(idp("x"), e.rsa_key, algorithm="RS256", headers={"kid": "ec1"})
    assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", tok), 401, "INVALID_USER_TOKEN")
    # Signed by a key that is not in the set but reusing a known kid: bad signature.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = jwt.encode(idp("x"), other, algorithm="RS256", headers={"kid": "rsa1"})
    body = assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", tok), 401, "INVALID_USER_TOKEN")
    assert "signature" in body["error"]["message"]
    # Wrong issuer / audience / expired through JWKS too.
    for bad, code in (
        (claims("x", iss="https://evil.example/", aud="my-app"), "INVALID_USER_TOKEN"),
        (claims("x", iss="https://idp.example.com/", aud="not-mine"), "INVALID_USER_TOKEN"),
        ({**idp("x"), "exp": int(time.time()) - 120}, "TOKEN_EXPIRED"),
    ):
        tok = jwt.encode(bad, e.rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
        assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", tok), 401, code)


async def test_hs_rs_confusion_and_alg_none_are_refused(jwks_env: JwksProject) -> None:
    e = jwks_env
    pem = e.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = public_jwk(e.rsa_key, "rsa1")
    # HS256 "signed" with the RSA public key (PEM, or the JWK's modulus) as the HMAC secret.
    for secret in (pem, pem.rstrip(b"\n"), json.dumps(jwk).encode()):
        tok = hand_made({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, idp("attacker"), secret)
        body = assert_error(
            await run(e.api, e.ro, e.pid, "SELECT auth.uid()", tok), 401, "INVALID_USER_TOKEN"
        )
        assert "jwtSecret" in body["error"]["message"]
    none = hand_made({"alg": "none", "kid": "rsa1"}, idp("attacker"), None)
    assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", none), 401, "INVALID_USER_TOKEN")
    none_upper = hand_made({"alg": "None", "kid": "rsa1"}, idp("attacker"), None)
    assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", none_upper), 401, "INVALID_USER_TOKEN")


async def test_unknown_kid_refetches_rate_limited(jwks_env: JwksProject) -> None:
    e = jwks_env
    new_key = ec.generate_private_key(ec.SECP256R1())
    tok = jwt.encode(idp("rotated"), new_key, algorithm="ES256", headers={"kid": "ec2"})
    await asyncio.sleep(1.1)  # past the refetch floor left by earlier tests
    before = e.jwks.hits
    for _ in range(5):
        body = assert_error(await run(e.api, e.ro, e.pid, "SELECT 1", tok), 401, "INVALID_USER_TOKEN")
        assert "kid" in body["error"]["message"]
    assert e.jwks.hits - before == 1  # one refetch for five unknown-kid tokens
    # The IdP rotates: the new key appears, and after the floor the token verifies.
    e.jwks.keys = [*e.jwks.keys, public_jwk(new_key, "ec2")]
    await asyncio.sleep(1.1)
    assert await rows(e.api, e.ro, e.pid, "SELECT auth.uid() AS uid", tok) == [{"uid": "rotated"}]
    assert e.jwks.hits - before == 2
    # Known kids are served from the cache: no fetch.
    tok = jwt.encode(idp("cached"), e.rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    for _ in range(3):
        assert await rows(e.api, e.ro, e.pid, "SELECT auth.uid() AS uid", tok) == [{"uid": "cached"}]
    assert e.jwks.hits - before == 2


async def test_unreachable_jwks_answers_503(jwks_env: JwksProject) -> None:
    e = jwks_env
    pid = await e.api.new_project(e.owner_token)
    ro = await e.api.new_key(e.owner_token, pid, "read")
    await configure(e.api, e.owner_token, pid, jwksUri=f"http://127.0.0.1:{free_port()}/jwks.json")
    tok = jwt.encode(claims("x"), e.ec_key, algorithm="ES256", headers={"kid": "ec1"})
    for _ in range(2):
        assert_error(await run(e.api, ro, pid, "SELECT 1", tok), 503, "IDENTITY_PROVIDER_UNAVAILABLE")
    # The project that trusts the working JWKS is unaffected.
    ok = jwt.encode(idp("still-fine"), e.ec_key, algorithm="ES256", headers={"kid": "ec1"})
    assert await rows(e.api, e.ro, e.pid, "SELECT auth.uid() AS uid", ok) == [{"uid": "still-fine"}]


async def test_jwks_on_private_address_refused_by_default(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read")
    with jwks_server() as server:
        key = ec.generate_private_key(ec.SECP256R1())
        server.keys = [public_jwk(key, "k")]
        await configure(api, project.owner_token, project.id, jwksUri=server.url)
        tok = jwt.encode(claims("x"), key, algorithm="ES256", headers={"kid": "k"})
        body = assert_error(
            await run(api, ro, project.id, "SELECT 1", tok), 503, "IDENTITY_PROVIDER_UNAVAILABLE"
        )
        assert "private" in body["error"]["message"]
        assert server.hits == 0


# -- refusals for own tokens ------------------------------------------------------------------------


async def test_own_token_refusals(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read", rateLimitRequests=MANY)
    uid, token = await project_user_token(api, project.id)
    assert await rows(api, ro, project.id, "SELECT auth.uid() AS uid", token) == [{"uid": uid}]
    admin = bearer(project.admin_key)
    await api.http.post(f"/api/projects/{project.id}/auth/users/{uid}/disable", headers=admin)
    assert_error(await run(api, ro, project.id, "SELECT 1", token), 401, "USER_DISABLED")
    await api.http.post(f"/api/projects/{project.id}/auth/users/{uid}/enable", headers=admin)
    assert await rows(api, ro, project.id, "SELECT auth.uid() AS uid", token) == [{"uid": uid}]
    await api.http.post(f"/api/projects/{project.id}/auth/users/{uid}/revoke-sessions", headers=admin)
    body = assert_error(await run(api, ro, project.id, "SELECT 1", token), 401, "INVALID_USER_TOKEN")
    assert "revoked" in body["error"]["message"]
    # Tampered payload (sub changed, signature kept): refused.
    _, token2 = await project_user_token(api, project.id)
    head, payload, sig = token2.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["sub"] = uid
    forged = f"{head}.{b64(json.dumps(data).encode())}.{sig}"
    assert_error(await run(api, ro, project.id, "SELECT 1", forged), 401, "INVALID_USER_TOKEN")
    # Another project's user token is refused here.
    _, owner = await api.new_user()
    other = await api.new_project(owner)
    _, foreign = await project_user_token(api, other)
    assert_error(await run(api, ro, project.id, "SELECT 1", foreign), 401, "INVALID_USER_TOKEN")


# -- requireUserAuth ------------------------------------------------------------------------------


async def test_require_user_auth_keys(api: Api, project) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "browser", "scope": "readwrite", "requireUserAuth": True, "rateLimitRequests": MANY},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201 and r.json()["apiKey"]["requireUserAuth"] is True
    key = r.json()["key"]
    listed = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    assert {k["id"]: k["requireUserAuth"] for k in listed.json()["apiKeys"]}[r.json()["apiKey"]["id"]] is True
    uid, token = await project_user_token(api, project.id)

    for extra in ({}, {"authUid": "victim"}):
        body = assert_error(await run(api, key, project.id, "SELECT 1", **extra), 401, "USER_TOKEN_REQUIRED")
        assert "X-Fluxbase-User-Token" in body["error"]["message"]
    hdr = {**bearer(key), "X-Fluxbase-Auth-Uid": "victim"}
    r = await api.http.post(
        "/api/execute-sql", json={"projectId": project.id, "query": "SELECT 1"}, headers=hdr
    )
    assert_error(r, 401, "USER_TOKEN_REQUIRED")
    assert_error(await run(api, key, project.id, "SELECT 1", "not-a-jwt"), 401, "INVALID_USER_TOKEN")
    assert await rows(api, key, project.id, "SELECT auth.uid() AS uid", token) == [{"uid": uid}]
    # With a token, authUid (body or header) cannot override it.
    assert_error(
        await run(api, key, project.id, "SELECT 1", token, authUid="victim"), 400, "VALIDATION_ERROR"
    )
    r = await api.http.post(
        "/api/execute-sql",
        json={"projectId": project.id, "query": "SELECT auth.uid() AS uid"},
        headers={**hdr, "X-Fluxbase-User-Token": token},
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    # Ordinary keys are unaffected.
    plain = await api.new_key(project.owner_token, project.id, "readwrite")
    assert await rows(api, plain, project.id, "SELECT auth.uid() AS uid") == [{"uid": None}]
    # execute-batch and records REST resolve identity the same way.
    assert (await run(api, project.admin_key, project.id, "CREATE TABLE t (id int)")).json()["success"]
    batch = {"projectId": project.id, "statements": [{"query": "SELECT auth.uid() AS uid"}]}
    assert_error(
        await api.http.post("/api/execute-batch", json=batch, headers=hdr), 401, "USER_TOKEN_REQUIRED"
    )
    r = await api.http.post(
        "/api/execute-batch", json=batch, headers={**bearer(key), "X-Fluxbase-User-Token": token}
    )
    assert r.json()["results"][0]["rows"] == [{"uid": uid}], r.text
    records = f"/api/projects/{project.id}/tables/t/records"
    assert_error(await api.http.get(records, headers=bearer(key)), 401, "USER_TOKEN_REQUIRED")
    r = await api.http.get(records, headers={**bearer(key), "X-Fluxbase-User-Token": token})
    assert r.status_code == 200, r.text


# -- the doc's four RLS patterns through end-user tokens ---------------------------------------------


async def setup(api: Api, key: str, pid: str, *statements: str) -> None:
    for q in statements:
        r = await run(api, key, pid, q)
        assert r.json()["success"], (q, r.text)


async def test_owner_rows_with_own_tokens(api: Api, project) -> None:
    rw = await api.new_key(
        project.owner_token, project.id, "readwrite", rateLimitRequests=MANY, requireUserAuth=True
    )
    alice, a_tok = await project_user_token(api, project.id)
    bob, b_tok = await project_user_token(api, project.id)
    await setup(
        api,
        project.admin_key,
        project.id,
        "CREATE TABLE todos (id serial PRIMARY KEY, user_id text NOT NULL DEFAULT auth.uid(), title text)",
        "ALTER TABLE todos ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON todos USING (user_id = auth.uid()) WITH CHECK (user_id = auth.uid())",
    )
    assert (await run(api, rw, project.id, "INSERT INTO todos (title) VALUES ('a1'), ('a2')", a_tok)).json()[
        "success"
    ]
    assert (await run(api, rw, project.id, "INSERT INTO todos (title) VALUES ('b1')", b_tok)).json()[
        "success"
    ]
    got = await rows(api, rw, project.id, "SELECT title, user_id FROM todos ORDER BY title", a_tok)
    assert got == [{"title": "a1", "user_id": alice}, {"title": "a2", "user_id": alice}]
    assert await rows(api, rw, project.id, "SELECT title FROM todos", b_tok) == [{"title": "b1"}]
    spoof = await run(api, rw, project.id, f"INSERT INTO todos (user_id, title) VALUES ('{bob}', 'x')", a_tok)
    assert spoof.json()["success"] is False and spoof.json()["error"]["details"] == "ERROR:  42501"
    upd = await run(api, rw, project.id, "UPDATE todos SET title = 'hacked'", a_tok)
    assert upd.json()["result"]["rowCount"] == 2
    assert await rows(api, rw, project.id, "SELECT title FROM todos", b_tok) == [{"title": "b1"}]


async def test_org_scoped_with_external_claims(api: Api, project) -> None:
    ro = await api.new_key(
        project.owner_token, project.id, "read", rateLimitRequests=MANY, requireUserAuth=True
    )
    secret = secrets.token_urlsafe(64)
    await configure(api, project.owner_token, project.id, jwtSecret=secret)
    await setup(
        api,
        project.admin_key,
        project.id,
        "CREATE TABLE docs (id serial, org_id text, title text)",
        "INSERT INTO docs (org_id, title) VALUES ('acme', 'plan'), ('acme', 'memo'), ('globex', 'x')",
        "ALTER TABLE docs ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY org ON docs USING (org_id = auth.jwt()->>'org_id')",
    )
    acme = jwt.encode(claims("u-1", org_id="acme"), secret, algorithm="HS256")
    globex = jwt.encode(claims("u-2", org_id="globex"), secret, algorithm="HS256")
    none = jwt.encode(claims("u-3"), secret, algorithm="HS256")
    got = await rows(api, ro, project.id, "SELECT title FROM docs ORDER BY title", acme)
    assert [r["title"] for r in got] == ["memo", "plan"]
    assert await rows(api, ro, project.id, "SELECT title FROM docs", globex) == [{"title": "x"}]
    assert await rows(api, ro, project.id, "SELECT title FROM docs", none) == []


async def test_public_read_owner_write_with_own_tokens(api: Api, project) -> None:
    rw = await api.new_key(project.owner_token, project.id, "readwrite", rateLimitRequests=MANY)
    alice, a_tok = await project_user_token(api, project.id)
    bob, b_tok = await project_user_token(api, project.id)
    await setup(
        api,
        project.admin_key,
        project.id,
        "CREATE TABLE articles (id serial PRIMARY KEY, author_id text, title text)",
        f"INSERT INTO articles (author_id, title) VALUES ('{alice}', 'A1'), ('{bob}', 'B1')",
        "ALTER TABLE articles ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY read_all ON articles FOR SELECT USING (true)",
        "CREATE POLICY ins_own ON articles FOR INSERT WITH CHECK (author_id = auth.uid())",
        "CREATE POLICY upd_own ON articles FOR UPDATE USING (author_id = auth.uid())",
    )
    got = await rows(api, rw, project.id, "SELECT title FROM articles ORDER BY title", b_tok)
    assert [r["title"] for r in got] == ["A1", "B1"]
    upd = await run(api, rw, project.id, "UPDATE articles SET title = 'edited'", a_tok)
    assert upd.json()["result"]["rowCount"] == 1
    got = await rows(api, rw, project.id, "SELECT author_id, title FROM articles ORDER BY author_id", b_tok)
    assert {r["author_id"]: r["title"] for r in got} == {alice: "edited", bob: "B1"}
    ins = await run(
        api, rw, project.id, f"INSERT INTO articles (author_id, title) VALUES ('{bob}', 'fake')", a_tok
    )
    assert ins.json()["success"] is False
    ins = await run(
        api, rw, project.id, f"INSERT INTO articles (author_id, title) VALUES ('{alice}', 'A2')", a_tok
    )
    assert ins.json()["success"] is True


async def test_full_lockdown_with_jwks_tokens(jwks_env: JwksProject) -> None:
    e = jwks_env
    rw = await e.api.new_key(e.owner_token, e.pid, "readwrite", rateLimitRequests=MANY)
    await setup(
        e.api,
        e.admin_key,
        e.pid,
        "CREATE TABLE audit (id serial, what text)",
        "INSERT INTO audit (what) VALUES ('login')",
        "ALTER TABLE audit ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY lock ON audit USING (false)",
    )
    tok = jwt.encode(
        idp("anyone", role="service_role"), e.rsa_key, algorithm="RS256", headers={"kid": "rsa1"}
    )
    for key in (rw, e.ro):
        assert await rows(e.api, key, e.pid, "SELECT * FROM audit", tok) == []
        r = await run(e.api, key, e.pid, "INSERT INTO audit (what) VALUES ('x')", tok)
        assert r.json()["success"] is False
    assert await rows(e.api, e.admin_key, e.pid, "SELECT count(*) AS n FROM audit") == [{"n": 1}]


# -- realtime: requireUserAuth keys reach it only through a user's realtime token ---------------------


async def test_realtime_with_require_user_auth_key(api: Api, project, instance, log_dir) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "browser", "scope": "read", "requireUserAuth": True},
        headers=bearer(project.owner_token),
    )
    key = r.json()["key"]
    uid, token = await project_user_token(api, project.id)
    mint = "/api/realtime/token"
    assert_error(
        await api.http.post(mint, json={"projectId": project.id}, headers=bearer(key)),
        401,
        "USER_TOKEN_REQUIRED",
    )
    with_token = {**bearer(key), "X-Fluxbase-User-Token": token}
    spoof = await api.http.post(mint, json={"projectId": project.id, "authUid": "victim"}, headers=with_token)
    assert_error(spoof, 400, "VALIDATION_ERROR")
    r = await api.http.post(mint, json={"projectId": project.id}, headers=with_token)
    assert r.status_code == 201, r.text
    rt_token = r.json()["token"]
    assert jwt.decode(rt_token, options={"verify_signature": False})["authUid"] == uid
    # An ordinary key still names any end user (a trusted server).
    r = await api.http.post(
        mint, json={"projectId": project.id, "authUid": "srv-user"}, headers=bearer(project.admin_key)
    )
    assert jwt.decode(r.json()["token"], options={"verify_signature": False})["authUid"] == "srv-user"

    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port))
    with run_service(["realtime"], env, port, log_dir):
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            room = f"project_{project.id}"
            await ws.send(json.dumps({"type": "subscribe", "roomId": room, "token": key}))
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "error" and msg["error"]["code"] == "USER_TOKEN_REQUIRED", msg
            await ws.send(json.dumps({"type": "subscribe", "roomId": room, "token": rt_token}))
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "subscribed", msg
