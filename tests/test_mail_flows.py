"""Email flows end to end, through the real API, its worker and a real SMTP catcher on 127.0.0.1:
each message is read from the catcher, its link or token followed, and the effect checked."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from fluxbase.devstack.procs import free_port
from fluxbase.mail.catcher import MailCatcher
from mailsupport import link_of, link_token, mail_env, token_of, wait_mail
from support import Api, assert_clean, assert_error, bearer, random_ip

APP = "https://app.example.com/auth"
PASSWORD = "correct horse battery"
MAX_PER_ADDRESS = 8


@dataclass
class Env:
    api: Api
    catcher: MailCatcher
    db: asyncpg.Pool
    owner_token: str


@pytest.fixture(scope="module")
async def env(spawn: Any, stack: Any) -> AsyncIterator[Env]:
    port = free_port()
    catcher = MailCatcher(port).start()
    try:
        async with spawn(
            **mail_env(port, FLUXBASE_MAIL_REQUEST_MAX_PER_ADDRESS=str(MAX_PER_ADDRESS))
        ) as inst:
            api = Api(inst.url)
            db = await asyncpg.create_pool(stack.database_url(inst.dbname), min_size=1, max_size=2)
            assert db is not None
            try:
                await api.register(email="root@example.com")
                _, token = await api.new_user()
                yield Env(api, catcher, db, token)
            finally:
                await db.close()
                await api.close()
    finally:
        catcher.stop()


async def new_project(env: Env, name: str = "Acme", **auth_settings: Any) -> str:
    pid = await env.api.new_project(env.owner_token, name)
    r = await env.api.http.patch(
        f"/api/projects/{pid}/auth/settings",
        json={"redirectUrls": [APP], **auth_settings},
        headers=bearer(env.owner_token),
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["redirectUrls"] == [APP]
    return pid


def email() -> str:
    return f"u-{secrets.token_hex(5)}@example.com"


async def post(env: Env, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await env.api.http.post(path, json=body, headers={"X-Forwarded-For": random_ip(), **headers})


async def register_user(env: Env, pid: str, address: str, **extra: Any) -> httpx.Response:
    return await post(
        env, f"/api/projects/{pid}/auth/register", {"email": address, "password": PASSWORD, **extra}
    )


async def login(env: Env, pid: str, address: str, password: str = PASSWORD) -> httpx.Response:
    return await post(env, f"/api/projects/{pid}/auth/login", {"email": address, "password": password})


async def test_required_verification_blocks_login_until_the_link_is_followed(env: Env) -> None:
    pid = await new_project(env, emailVerification="required")
    address = email()
    r = await register_user(env, pid, address, redirectTo=APP + "/callback")
    assert r.status_code == 201, r.text
    assert r.json()["user"]["emailVerified"] is False
    assert_error(await login(env, pid, address), 403, "EMAIL_NOT_VERIFIED")

    message = await wait_mail(env.catcher, address, lambda m: "Confirm your email" in m.subject)
    assert "Acme" in message.subject
    link = link_of(message)
    assert link.startswith(APP + "/callback?")
    kind, token = link_token(link)
    assert kind == "verify" and token == token_of(message)

    r = await post(env, f"/api/projects/{pid}/auth/verify", {"token": token})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["emailVerified"] is True
    assert (await login(env, pid, address)).status_code == 200
    # Single use.
    assert_error(
        await post(env, f"/api/projects/{pid}/auth/verify", {"token": token}), 400, "INVALID_EMAIL_TOKEN"
    )


async def test_password_reset_sets_the_password_and_revokes_every_session(env: Env) -> None:
    pid = await new_project(env)
    address = email()
    assert (await register_user(env, pid, address)).status_code == 201
    old = (await login(env, pid, address)).json()

    r = await post(env, f"/api/projects/{pid}/auth/recover", {"email": address, "redirectTo": APP + "/reset"})
    assert r.status_code == 202, r.text
    message = await wait_mail(env.catcher, address, lambda m: "Reset your" in m.subject)
    kind, token = link_token(link_of(message))
    assert kind == "reset"
    assert_error(
        await post(env, f"/api/projects/{pid}/auth/reset-password", {"token": token, "password": "short"}),
        400,
        "VALIDATION_ERROR",
    )  # refused before the token is used: it still works below
    new_password = "a brand new passphrase"
    r = await post(
        env, f"/api/projects/{pid}/auth/reset-password", {"token": token, "password": new_password}
    )
    assert r.status_code == 200, r.text
    assert r.json()["revokedSessions"] == 1
    assert_clean(r, token)

    me = await env.api.http.get(f"/api/projects/{pid}/auth/me", headers=bearer(old["accessToken"]))
    assert_error(me, 401, "INVALID_USER_TOKEN")
    refresh = await post(env, f"/api/projects/{pid}/auth/refresh", {"refreshToken": old["refreshToken"]})
    assert_error(refresh, 401, "INVALID_USER_TOKEN")
    assert_error(await login(env, pid, address), 401, "AUTH_REQUIRED")
    assert (await login(env, pid, address, new_password)).status_code == 200
    again = await post(
        env, f"/api/projects/{pid}/auth/reset-password", {"token": token, "password": "another passphrase"}
    )
    assert_error(again, 400, "INVALID_EMAIL_TOKEN")


async def test_magic_link_signs_in_once(env: Env) -> None:
    pid = await new_project(env)
    address = email()
    assert (await register_user(env, pid, address)).status_code == 201
    assert (await post(env, f"/api/projects/{pid}/auth/magic-link", {"email": address})).status_code == 202
    message = await wait_mail(env.catcher, address, lambda m: "Sign in" in m.subject)
    link = link_of(message)
    assert link.startswith(APP + "?")  # no redirectTo: the first allowed URL
    _, token = link_token(link)
    r = await post(env, f"/api/projects/{pid}/auth/magic-link/verify", {"token": token})
    assert r.status_code == 200, r.text
    pair = r.json()
    assert pair["user"]["email"] == address and pair["user"]["emailVerified"] is True
    me = await env.api.http.get(f"/api/projects/{pid}/auth/me", headers=bearer(pair["accessToken"]))
    assert me.status_code == 200 and me.json()["user"]["email"] == address
    again = await post(env, f"/api/projects/{pid}/auth/magic-link/verify", {"token": token})
    assert_error(again, 400, "INVALID_EMAIL_TOKEN")
    # A token of one kind is not a token of another.
    assert_error(
        await post(env, f"/api/projects/{pid}/auth/verify", {"token": token}), 400, "INVALID_EMAIL_TOKEN"
    )


async def test_email_change_is_confirmed_at_the_new_address(env: Env) -> None:
    pid = await new_project(env)
    address, new_address = email(), email()
    assert (await register_user(env, pid, address)).status_code == 201
    pair = (await login(env, pid, address)).json()
    r = await post(
        env,
        f"/api/projects/{pid}/auth/email-change",
        {"email": new_address},
        Authorization=f"Bearer {pair['accessToken']}",
    )
    assert r.status_code == 202, r.text
    message = await wait_mail(env.catcher, new_address)
    assert new_address in message.text
    _, token = link_token(link_of(message))
    # Not changed until confirmed.
    assert (await login(env, pid, address)).status_code == 200
    r = await post(env, f"/api/projects/{pid}/auth/email-change/confirm", {"token": token})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["email"] == new_address
    assert (await login(env, pid, new_address)).status_code == 200
    assert_error(await login(env, pid, address), 401, "AUTH_REQUIRED")
    again = await post(env, f"/api/projects/{pid}/auth/email-change/confirm", {"token": token})
    assert_error(again, 400, "INVALID_EMAIL_TOKEN")


async def test_the_old_address_is_told_when_the_email_changes(env: Env) -> None:
    pid = await new_project(env)
    address, new_address = email(), email()
    assert (await register_user(env, pid, address)).status_code == 201
    pair = (await login(env, pid, address)).json()
    auth = f"Bearer {pair['accessToken']}"
    assert (
        await post(env, f"/api/projects/{pid}/auth/email-change", {"email": new_address}, Authorization=auth)
    ).status_code == 202
    _, token = link_token(link_of(await wait_mail(env.catcher, new_address)))
    assert (
        await post(env, f"/api/projects/{pid}/auth/email-change/confirm", {"token": token})
    ).status_code == 200
    notice = await wait_mail(env.catcher, address, lambda m: "changed" in m.subject.lower())
    assert new_address in notice.text and new_address in notice.html and "Acme" in notice.subject
    # A notice, not a credential: no token in it.
    assert token not in notice.text and "fxm_" not in notice.text


async def test_sign_up_with_a_taken_address_answers_like_a_new_one_when_verification_is_on(env: Env) -> None:
    pid = await new_project(env, emailVerification="required")
    taken, fresh = email(), email()
    first = await register_user(env, pid, taken, displayName="Ada")
    assert first.status_code == 201, first.text
    first_verify = await wait_mail(env.catcher, taken, lambda m: "Confirm your email" in m.subject)
    verify_token = token_of(first_verify)
    assert (await post(env, f"/api/projects/{pid}/auth/verify", {"token": verify_token})).status_code == 200

    again = await register_user(env, pid, taken, displayName="Mallory")
    new = await register_user(env, pid, fresh, displayName="Mallory")
    assert again.status_code == new.status_code == 201, (again.text, new.text)
    a, b = again.json(), new.json()
    assert set(a) == set(b) and set(a["user"]) == set(b["user"])
    assert a["user"]["emailVerified"] is b["user"]["emailVerified"] is False
    assert a["user"]["email"] == taken and a["user"]["id"] != first.json()["user"]["id"]
    # The real owner hears about it (with a way back in), and nothing about them changed.
    notice = await wait_mail(env.catcher, taken, lambda m: "already" in m.subject.lower())
    kind, _ = link_token(link_of(notice))
    assert kind == "reset"
    assert (await login(env, pid, taken)).status_code == 200
    users = await env.db.fetch(
        "SELECT display_name FROM fluxbase.project_users WHERE project_id = $1 AND lower(email) = $2",
        pid,
        taken,
    )
    assert [u["display_name"] for u in users] == ["Ada"]


async def test_sign_up_with_a_taken_address_is_a_conflict_when_verification_is_off(env: Env) -> None:
    # Without verification the new account could sign in at once, so the answer cannot hide it.
    pid = await new_project(env)
    taken = email()
    assert (await register_user(env, pid, taken)).status_code == 201
    assert_error(await register_user(env, pid, taken), 409, "CONFLICT")


async def test_an_expired_token_is_refused(env: Env) -> None:
    pid = await new_project(env)
    address = email()
    assert (await register_user(env, pid, address)).status_code == 201
    assert (await post(env, f"/api/projects/{pid}/auth/recover", {"email": address})).status_code == 202
    _, token = link_token(link_of(await wait_mail(env.catcher, address)))
    await env.db.execute(
        """UPDATE fluxbase.mail_tokens SET expires_at = now() - interval '1 second'
           WHERE project_id = $1 AND purpose = 'reset'""",
        pid,
    )
    r = await post(
        env,
        f"/api/projects/{pid}/auth/reset-password",
        {"token": token, "password": "a brand new passphrase"},
    )
    assert_error(r, 400, "INVALID_EMAIL_TOKEN")
    assert (await login(env, pid, address)).status_code == 200  # the old password still holds


async def test_tokens_are_stored_hashed(env: Env) -> None:
    pid = await new_project(env)
    address = email()
    assert (await register_user(env, pid, address)).status_code == 201
    assert (await post(env, f"/api/projects/{pid}/auth/magic-link", {"email": address})).status_code == 202
    token = token_of(await wait_mail(env.catcher, address))
    dump = await env.db.fetchval(
        "SELECT string_agg(t::text, ' ') FROM fluxbase.mail_tokens t WHERE project_id = $1", pid
    )
    assert token not in dump and token.encode().hex() not in dump
    # The sent message's bodies are gone from the outbox (they held the token).
    assert [e["status"] for e in await sent_log(env, pid)] == ["sent"]
    bodies = await env.db.fetchval(
        "SELECT string_agg(text_body || html_body, '') FROM fluxbase.mail_outbox WHERE project_id = $1", pid
    )
    assert not bodies


async def test_request_endpoints_answer_the_same_for_unknown_addresses(env: Env) -> None:
    pid = await new_project(env)
    known = email()
    assert (await register_user(env, pid, known)).status_code == 201
    unknowns = []
    for path in ("recover", "magic-link", "verify/request"):
        answers: dict[str, list[httpx.Response]] = {}
        unknowns.append(email())
        for address in (known, unknowns[-1]):
            for _ in range(2):  # 3 paths x 2 stays under the per-address limit
                r = await post(env, f"/api/projects/{pid}/auth/{path}", {"email": address, "redirectTo": APP})
                answers.setdefault(address, []).append(r)
        known_r, unknown_r = answers.values()
        for a, b in zip(known_r, unknown_r, strict=True):
            assert (a.status_code, a.content) == (b.status_code, b.content), path
            assert a.status_code == 202
            assert set(a.headers) == set(b.headers)
    # Only the known address got mail (verification too: it is not verified yet).
    queued = await env.db.fetch("SELECT kind, recipient FROM fluxbase.mail_outbox WHERE project_id = $1", pid)
    assert sorted(r["kind"] for r in queued) == sorted(["reset", "magic_link", "verify"] * 2)
    assert {r["recipient"] for r in queued} == {known}


async def test_request_endpoints_are_throttled_per_address_the_same_way(env: Env) -> None:
    pid = await new_project(env)
    known, unknown = email(), email()
    assert (await register_user(env, pid, known)).status_code == 201
    for address in (known, unknown):
        for _ in range(MAX_PER_ADDRESS):
            r = await post(env, f"/api/projects/{pid}/auth/recover", {"email": address})
            assert r.status_code == 202, r.text
        limited = await post(env, f"/api/projects/{pid}/auth/recover", {"email": address})
        body = assert_error(limited, 429, "RATE_LIMIT")
        assert body["error"]["message"] == "Too many email requests. Try again later."
        assert int(limited.headers["Retry-After"]) > 0


async def test_request_endpoints_are_throttled_per_client(spawn: Any) -> None:
    port = free_port()
    async with spawn(**mail_env(port, FLUXBASE_MAIL_REQUEST_MAX_PER_IP="3")) as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            ip = random_ip()
            for i in range(3):
                r = await api.http.post(
                    f"/api/projects/{pid}/auth/recover",
                    json={"email": email()},
                    headers={"X-Forwarded-For": ip},
                )
                assert r.status_code == 202, (i, r.text)
            r = await api.http.post(
                f"/api/projects/{pid}/auth/recover", json={"email": email()}, headers={"X-Forwarded-For": ip}
            )
            assert_error(r, 429, "RATE_LIMIT")
        finally:
            await api.close()


@pytest.mark.parametrize(
    "redirect",
    [
        "https://evil.example.com/auth",
        "https://app.example.com.evil.com/auth",
        "https://app.example.com/authx",
        "https://app.example.com/",
        "https://user@app.example.com/auth",
        "http://app.example.com/auth",
        "https://app.example.com:8443/auth",
        "//evil.example.com/auth",
        "javascript:alert(1)//app.example.com/auth",
        "https://app.example.com/auth/../admin",
        "https://app.example.com/auth/%2e%2e/admin",  # browsers read %2e%2e as ..
        "https://app.example.com/auth/%2E%2e/admin",
        "https://app.example.com/auth/.%2e/admin",
        "https://app.example.com\\@evil.example.com/auth",
        "https://app.example.com/auth#@evil.example.com",
        "/auth",
    ],
)
async def test_a_redirect_outside_the_allow_list_is_refused(env: Env, redirect: str) -> None:
    pid = await new_project(env)
    known = email()
    assert (await register_user(env, pid, known)).status_code == 201
    for address in (known, email()):
        for path in ("recover", "magic-link", "verify/request"):
            r = await post(
                env, f"/api/projects/{pid}/auth/{path}", {"email": address, "redirectTo": redirect}
            )
            assert_error(r, 400, "REDIRECT_NOT_ALLOWED")
    r = await register_user(env, pid, email(), redirectTo=redirect)
    assert_error(r, 400, "REDIRECT_NOT_ALLOWED")
    assert await env.db.fetchval("SELECT count(*) FROM fluxbase.mail_tokens WHERE project_id = $1", pid) == 0


async def test_redirect_allow_list_is_validated(env: Env) -> None:
    pid = await env.api.new_project(env.owner_token)
    for bad in (
        ["ftp://x.example.com"],
        ["https://x.example.com/?next=1"],
        ["not a url"],
        ["https://a@x.example.com"],
    ):
        r = await env.api.http.patch(
            f"/api/projects/{pid}/auth/settings", json={"redirectUrls": bad}, headers=bearer(env.owner_token)
        )
        assert_error(r, 400, "VALIDATION_ERROR")
    r = await env.api.http.patch(
        f"/api/projects/{pid}/auth/settings",
        json={"emailVerification": "sometimes"},
        headers=bearer(env.owner_token),
    )
    assert_error(r, 400, "VALIDATION_ERROR")


async def test_dashboard_password_reset(env: Env) -> None:
    user = await env.api.register()
    session = await env.api.login(user["email"], user["password"])
    r = await post(env, "/api/auth/recover", {"email": user["email"]})
    assert r.status_code == 202
    unknown = await post(env, "/api/auth/recover", {"email": email()})
    assert (unknown.status_code, unknown.content) == (r.status_code, r.content)
    message = await wait_mail(
        env.catcher, user["email"], lambda m: "Reset your Fluxbase password" in m.subject
    )
    kind, token = link_token(link_of(message))
    assert kind == "account_reset"
    r = await post(env, "/api/auth/reset-password", {"token": token, "password": "a brand new passphrase"})
    assert r.status_code == 200, r.text
    assert r.json()["revokedSessions"] >= 1
    assert_error(await env.api.http.get("/api/auth/me", headers=bearer(session)), 401, "AUTH_REQUIRED")
    assert await env.api.login(user["email"], "a brand new passphrase")
    again = await post(
        env, "/api/auth/reset-password", {"token": token, "password": "yet another passphrase"}
    )
    assert_error(again, 400, "INVALID_EMAIL_TOKEN")
    # A project user's token is not a dashboard token, and the other way round.
    pid = await new_project(env)
    r = await post(env, f"/api/projects/{pid}/auth/reset-password", {"token": token, "password": "x" * 20})
    assert_error(r, 400, "INVALID_EMAIL_TOKEN")


async def test_team_invitation_is_emailed_and_accepted_only_by_the_invitee(env: Env) -> None:
    pid = await env.api.new_project(env.owner_token, "Team <b>Project</b>")
    invitee, invitee_token = await env.api.new_user()
    _, stranger_token = await env.api.new_user()
    r = await env.api.http.post(
        "/api/team",
        json={"projectId": pid, "email": invitee["email"], "role": "developer"},
        headers=bearer(env.owner_token),
    )
    assert r.status_code == 201, r.text
    invite_id = r.json()["invite"]["id"]
    message = await wait_mail(env.catcher, invitee["email"], lambda m: "invited" in m.subject)
    assert invite_id in link_of(message) and invite_id in message.text
    assert "Team <b>Project</b>" in message.text  # the text body is text
    assert "Team &lt;b&gt;Project&lt;/b&gt;" in message.html and "<b>Project</b>" not in message.html

    answer = {"inviteId": invite_id, "status": "accepted"}
    r = await env.api.http.post("/api/team/invites/accept", json=answer, headers=bearer(stranger_token))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await env.api.http.post("/api/team/invites/accept", json=answer, headers=bearer(invitee_token))
    assert r.status_code == 200, r.text
    team = await env.api.http.get("/api/team", params={"projectId": pid}, headers=bearer(env.owner_token))
    assert invitee["email"] in {m["email"] for m in team.json()["members"]}

    entries = await sent_log(env, pid)
    assert [(e["kind"], e["to"], e["status"]) for e in entries] == [("invite", invitee["email"], "sent")]


async def sent_log(env: Env, pid: str, count: int = 1) -> list[dict[str, Any]]:
    """The project's mail log once `count` messages are finished (the worker records it after the
    server took the message, so shortly after the catcher has it)."""
    deadline = time.monotonic() + 20
    while True:
        log = await env.api.http.get(f"/api/projects/{pid}/mail/log", headers=bearer(env.owner_token))
        assert log.status_code == 200, log.text
        entries: list[dict[str, Any]] = log.json()["messages"]
        if sum(e["status"] != "pending" for e in entries) >= count or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(0.2)


async def test_a_token_works_once_under_concurrency_and_only_in_its_project(env: Env) -> None:
    pid, other = await new_project(env), await new_project(env)
    address = email()
    assert (await register_user(env, pid, address)).status_code == 201
    assert (await register_user(env, other, address)).status_code == 201
    assert (await post(env, f"/api/projects/{pid}/auth/magic-link", {"email": address})).status_code == 202
    _, token = link_token(link_of(await wait_mail(env.catcher, address, lambda m: "Sign in" in m.subject)))
    # The same address in another project: the token is not that project's.
    r = await post(env, f"/api/projects/{other}/auth/magic-link/verify", {"token": token})
    assert_error(r, 400, "INVALID_EMAIL_TOKEN")
    results = await asyncio.gather(
        *(post(env, f"/api/projects/{pid}/auth/magic-link/verify", {"token": token}) for _ in range(8))
    )
    assert sorted(r.status_code for r in results) == [200] + [400] * 7
    sessions = await env.db.fetchval(
        """SELECT count(*) FROM fluxbase.project_user_sessions s
           JOIN fluxbase.project_users u ON u.id = s.user_id WHERE u.project_id = $1""",
        pid,
    )
    assert sessions == 1


def _csrf(html: str) -> str:
    m = re.search(r'name="_csrf" value="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1)


async def test_the_account_reset_link_lands_on_a_dashboard_form_that_sets_the_password(env: Env) -> None:
    user = await env.api.register()
    r = await post(env, "/api/auth/recover", {"email": user["email"]})
    assert r.status_code == 202
    message = await wait_mail(
        env.catcher, user["email"], lambda m: "Reset your Fluxbase password" in m.subject
    )
    link = link_of(message)
    assert urlsplit(link).path == "/dashboard/reset-password", link
    async with httpx.AsyncClient(timeout=30) as browser:  # a browser: cookies kept, links followed
        page = await browser.get(link)
        assert page.status_code == 200 and 'name="password2"' in page.text
        token = link_token(link)[1]
        answer = await browser.post(
            env.api.base_url + "/dashboard/reset-password",
            data={
                "_csrf": _csrf(page.text),
                "token": token,
                "password": "new passphrase 42",
                "password2": "new passphrase 42",
            },
            headers={"X-Forwarded-For": random_ip()},
        )
        assert answer.status_code == 200 and "Your password is changed" in answer.text, answer.text[:2000]
        # Once only.
        again = await browser.post(
            env.api.base_url + "/dashboard/reset-password",
            data={
                "_csrf": _csrf(page.text),
                "token": token,
                "password": "other passphrase 43",
                "password2": "other passphrase 43",
            },
        )
        assert again.status_code == 400 and "INVALID_EMAIL_TOKEN" in again.text
    assert await env.api.login(user["email"], "new passphrase 42")


async def test_the_invitation_link_leads_the_invitee_to_accept_it_in_the_dashboard(env: Env) -> None:
    pid = await env.api.new_project(env.owner_token, "Linked")
    invitee, _ = await env.api.new_user()
    r = await env.api.http.post(
        "/api/team",
        json={"projectId": pid, "email": invitee["email"], "role": "viewer"},
        headers=bearer(env.owner_token),
    )
    assert r.status_code == 201, r.text
    message = await wait_mail(env.catcher, invitee["email"], lambda m: "Linked" in m.subject)
    link = link_of(message)
    assert urlsplit(link).path == "/dashboard/invites", link
    async with httpx.AsyncClient(timeout=30, follow_redirects=True) as browser:
        page = await browser.get(link)  # not signed in: the sign-in page
        assert urlsplit(str(page.url)).path == "/dashboard/sign-in" and 'name="password"' in page.text
        signed = await browser.post(
            env.api.base_url + "/dashboard/sign-in",
            data={"_csrf": _csrf(page.text), "email": invitee["email"], "password": invitee["password"]},
            headers={"X-Forwarded-For": random_ip()},
        )
        assert signed.status_code == 200, signed.text[:2000]
        page = await browser.get(link)
        assert "Linked" in page.text and "Accept" in page.text, page.text[:3000]
        invite_id = r.json()["invite"]["id"]
        accepted = await browser.post(
            env.api.base_url + f"/dashboard/invites/{invite_id}",
            data={"_csrf": _csrf(page.text), "status": "accepted"},
        )
        assert accepted.status_code == 200
    team = await env.api.http.get("/api/team", params={"projectId": pid}, headers=bearer(env.owner_token))
    assert invitee["email"] in {m["email"] for m in team.json()["members"]}
