"""Mail delivery: an SMTP outage loses nothing and blocks no request; bounces and the per-project
log; templates (validated, previewed, overridden per project, user values escaped in HTML); the
catcher's HTTP endpoint; the SMTP settings."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import httpx
import pytest

from fluxbase.config import ConfigError, load_settings
from fluxbase.devstack.procs import free_port
from fluxbase.mail.catcher import MailCatcher
from mailsupport import mail_env, token_of, wait_mail
from support import Api, assert_error, bearer, random_ip

PASSWORD = "correct horse battery"


def email() -> str:
    return f"u-{secrets.token_hex(5)}@example.com"


async def mail_log(api: Api, token: str, pid: str) -> list[dict[str, Any]]:
    r = await api.http.get(f"/api/projects/{pid}/mail/log", headers=bearer(token))
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


async def wait_log(api: Api, token: str, pid: str, ok: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """Poll the log until `ok(entries)`; the worker writes it, there is no event to await."""
    deadline = time.monotonic() + timeout
    while True:
        entries = await mail_log(api, token, pid)
        if ok(entries):
            return entries
        assert time.monotonic() < deadline, entries
        await asyncio.sleep(0.2)


async def user_in(api: Api, pid: str) -> str:
    address = email()
    r = await api.http.post(
        f"/api/projects/{pid}/auth/register",
        json={"email": address, "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 201, r.text
    return address


async def test_smtp_down_then_back_delivers_everything_queued(spawn: Any) -> None:
    port = free_port()  # nothing listens here yet
    async with spawn(**mail_env(port, FLUXBASE_MAIL_RETRY_SCHEDULE=",".join(["1"] * 60))) as inst:
        api = Api(inst.url)
        catcher: MailCatcher | None = None
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            addresses = [await user_in(api, pid) for _ in range(3)]
            for address in addresses:
                start = time.perf_counter()
                r = await api.http.post(
                    f"/api/projects/{pid}/auth/magic-link",
                    json={"email": address},
                    headers={"X-Forwarded-For": random_ip()},
                )
                assert r.status_code == 202, r.text
                assert time.perf_counter() - start < 2.0  # the request does not wait for SMTP
            # The worker has tried and failed, and keeps the messages.
            entries = await wait_log(
                api, token, pid, lambda es: len(es) == 3 and all(e["attempts"] >= 2 for e in es)
            )
            assert all(e["status"] == "pending" and e["lastError"] for e in entries)
            assert all("Connection" in e["lastError"] or "refused" in e["lastError"] for e in entries), (
                entries
            )

            catcher = MailCatcher(port).start()
            for address in addresses:
                message = await wait_mail(catcher, address)
                assert token_of(message)
            entries = await wait_log(api, token, pid, lambda es: all(e["status"] == "sent" for e in es))
            assert sorted(e["to"] for e in entries) == sorted(addresses)
            # Each message exactly once.
            assert sorted(t for m in catcher.messages() for t in m.to) == sorted(addresses)
        finally:
            if catcher is not None:
                catcher.stop()
            await api.close()


async def test_a_refused_recipient_is_logged_as_bounced_and_not_retried(spawn: Any) -> None:
    port = free_port()
    refused = email()
    catcher = MailCatcher(port, refuse=frozenset({refused})).start()
    try:
        async with spawn(**mail_env(port, FLUXBASE_MAIL_RETRY_SCHEDULE="1,1,1")) as inst:
            api = Api(inst.url)
            try:
                _, token = await api.new_user()
                pid = await api.new_project(token)
                for address in (refused, email()):
                    r = await api.http.post(
                        f"/api/projects/{pid}/auth/register",
                        json={"email": address, "password": PASSWORD},
                        headers={"X-Forwarded-For": random_ip()},
                    )
                    assert r.status_code == 201
                    r = await api.http.post(
                        f"/api/projects/{pid}/auth/recover",
                        json={"email": address},
                        headers={"X-Forwarded-For": random_ip()},
                    )
                    assert r.status_code == 202
                entries = await wait_log(
                    api, token, pid, lambda es: all(e["status"] != "pending" for e in es)
                )
                by_to = {e["to"]: e for e in entries}
                assert by_to[refused]["status"] == "bounced" and by_to[refused]["attempts"] == 1
                assert "550" in by_to[refused]["lastError"]
                others = [e for e in entries if e["to"] != refused]
                assert [e["status"] for e in others] == ["sent"]
                # The log shows no bodies (they carried tokens).
                assert "token" not in str(entries).lower()
            finally:
                await api.close()
    finally:
        catcher.stop()


@pytest.fixture(scope="module")
async def mailer(spawn: Any) -> Any:
    port = free_port()
    catcher = MailCatcher(port).start()
    try:
        async with spawn(**mail_env(port)) as inst:
            api = Api(inst.url)
            try:
                _, token = await api.new_user()
                yield api, token, catcher
            finally:
                await api.close()
    finally:
        catcher.stop()


async def test_templates_are_validated(mailer: Any) -> None:
    api, token, _ = mailer
    pid = await api.new_project(token)
    good = {"subject": "Hi", "text": "{{ link }}", "html": "<a href='{{ link }}'>go</a>"}
    cases = [
        ("nonsense", good),
        ("account_reset", good),  # the instance's own message, not a project's
        ("reset", {**good, "text": "{{ link }} {{ password }}"}),
        ("reset", {**good, "text": "no link at all"}),
        ("reset", {**good, "html": ""}),
        ("reset", {**good, "subject": "two\r\nBcc: victim@example.com"}),
        ("reset", {**good, "subject": "x" * 201}),
        ("invite", {**good, "text": "{{ token }}"}),  # invitations carry no token
    ]
    for kind, body in cases:
        r = await api.http.put(f"/api/projects/{pid}/mail/templates/{kind}", json=body, headers=bearer(token))
        assert_error(r, 400, "VALIDATION_ERROR")
    listed = await api.http.get(f"/api/projects/{pid}/mail/templates", headers=bearer(token))
    assert not any(t["custom"] for t in listed.json()["templates"])


async def test_preview_escapes_user_values_in_html(mailer: Any) -> None:
    api, token, _ = mailer
    name = "<script>alert(1)</script>"
    pid = await api.new_project(token, name)
    r = await api.http.post(
        f"/api/projects/{pid}/mail/templates/magic_link/preview", json={}, headers=bearer(token)
    )
    assert r.status_code == 200, r.text
    preview = r.json()["preview"]
    assert name in preview["subject"] and name in preview["text"]
    assert "<script>" not in preview["html"] and "&lt;script&gt;alert(1)&lt;/script&gt;" in preview["html"]
    # An unsaved template previews without being saved.
    r = await api.http.post(
        f"/api/projects/{pid}/mail/templates/reset/preview",
        json={
            "subject": "Reset for {{ project_name }}",
            "html": "<p>{{ email }}</p><a href='{{ link }}'>x</a>",
        },
        headers=bearer(token),
    )
    assert r.status_code == 200, r.text
    assert r.json()["preview"]["subject"] == f"Reset for {name}"
    assert r.json()["preview"]["html"].startswith("<p>ada@example.com</p>")
    listed = await api.http.get(f"/api/projects/{pid}/mail/templates", headers=bearer(token))
    assert not any(t["custom"] for t in listed.json()["templates"])


async def test_a_project_override_is_used_and_can_be_reset(mailer: Any) -> None:
    api, token, catcher = mailer
    pid = await api.new_project(token, 'Shop "&" <Co>')
    body = {
        "subject": "Your {{ project_name }} link",
        "text": "Custom text {{ link }} code {{ token }}",
        "html": "<h1>{{ project_name }}</h1><p>{{ email }}</p><p>{{ token }}</p>",
    }
    r = await api.http.put(f"/api/projects/{pid}/mail/templates/magic_link", json=body, headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["template"]["custom"] is True
    address = await user_in(api, pid)
    r = await api.http.post(
        f"/api/projects/{pid}/auth/magic-link",
        json={"email": address},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 202
    message = await wait_mail(catcher, address)
    assert message.subject == 'Your Shop "&" <Co> link'
    assert message.text.startswith("Custom text")
    assert "<h1>Shop &quot;&amp;&quot; &lt;Co&gt;</h1>" in message.html
    assert token_of(message)

    r = await api.http.delete(f"/api/projects/{pid}/mail/templates/magic_link", headers=bearer(token))
    assert r.status_code == 200 and r.json()["template"]["custom"] is False
    listed = await api.http.get(f"/api/projects/{pid}/mail/templates", headers=bearer(token))
    assert {t["kind"] for t in listed.json()["templates"]} == {
        "invite",
        "verify",
        "reset",
        "magic_link",
        "email_change",
        "email_changed",
        "signup_existing",
    }


async def test_templates_and_log_need_project_management(mailer: Any) -> None:
    api, token, _ = mailer
    pid = await api.new_project(token)
    read_key = await api.new_key(token, pid, "read")
    _, stranger = await api.new_user()
    for creds in (read_key, stranger):
        for r in (
            await api.http.get(f"/api/projects/{pid}/mail/templates", headers=bearer(creds)),
            await api.http.get(f"/api/projects/{pid}/mail/log", headers=bearer(creds)),
        ):
            assert r.status_code in (403, 404), r.text
            assert r.json()["success"] is False


async def test_catcher_serves_its_messages_over_http() -> None:
    smtp_port, http_port = free_port(), free_port()
    catcher = MailCatcher(smtp_port, http_port).start()
    try:
        import smtplib
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "hello"
        msg.set_content("body text")
        msg.add_alternative("<p>body html</p>", subtype="html")
        await asyncio.to_thread(lambda: smtplib.SMTP("127.0.0.1", smtp_port, timeout=5).send_message(msg))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            got = (await client.get("/messages", params={"to": "b@example.com"})).json()["messages"]
            assert [(m["subject"], m["text"].strip(), m["html"].strip()) for m in got] == [
                ("hello", "body text", "<p>body html</p>")
            ]
            assert (await client.get("/messages", params={"to": "c@example.com"})).json()["messages"] == []
            assert (await client.delete("/messages")).status_code == 200
            assert (await client.get("/messages")).json()["messages"] == []
    finally:
        catcher.stop()


BASE_ENV = {
    "FLUXBASE_SECRET_KEY": "s" * 48,
    "FLUXBASE_DATABASE_URL": "postgresql://x@127.0.0.1/x",
    "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:1",
    "FLUXBASE_S3_ACCESS_KEY": "a",
    "FLUXBASE_S3_SECRET_KEY": "b",
}


def test_smtp_settings() -> None:
    s = load_settings({**BASE_ENV, "FLUXBASE_SMTP_HOST": "smtp.example.com"}).mail
    assert (s.smtp_port, s.smtp_security) == (587, "starttls")
    s = load_settings(
        {**BASE_ENV, "FLUXBASE_SMTP_HOST": "smtp.example.com", "FLUXBASE_SMTP_SECURITY": "tls"}
    ).mail
    assert s.smtp_port == 465
    assert load_settings({**BASE_ENV, "FLUXBASE_SMTP_HOST": "127.0.0.1", "FLUXBASE_SMTP_SECURITY": "none"})
    for bad in (
        {"FLUXBASE_SMTP_HOST": "smtp.example.com", "FLUXBASE_SMTP_SECURITY": "none"},  # clear text off-host
        {"FLUXBASE_SMTP_SECURITY": "ssl3"},
        {"FLUXBASE_SMTP_USERNAME": "only-a-user"},
        {"FLUXBASE_MAIL_FROM": "no address"},
        {"FLUXBASE_MAIL_RETRY_SCHEDULE": "0"},
        {"FLUXBASE_SMTP_TIMEOUT_SECONDS": "0"},
    ):
        with pytest.raises(ConfigError):
            load_settings({**BASE_ENV, **bad})
