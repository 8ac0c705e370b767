"""Message templates: a plain-text and an HTML body per kind, overridable per project.

A template is text with `{{ name }}` placeholders; each kind allows a fixed set of names and a
template naming any other is refused when it is saved. Values are inserted as they are into the
text body and the subject (with line breaks removed), and HTML-escaped into the HTML body, so
nothing a user controls (a display name, an address, a project name) becomes markup.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fluxbase.errors import ValidationError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
MAX_SUBJECT = 200
MAX_BODY = 20_000

COMMON = ("project_name", "email", "app_name")
# Kinds, the names each may use, and the one of them that must appear in both bodies (the link
# or token is the point of the message).
FIELDS: dict[str, tuple[str, ...]] = {
    "invite": (*COMMON, "link", "role", "invite_id", "expires_hours"),
    "verify": (*COMMON, "link", "token", "expires_hours"),
    "reset": (*COMMON, "link", "token", "expires_minutes"),
    "magic_link": (*COMMON, "link", "token", "expires_minutes"),
    "email_change": (*COMMON, "link", "token", "new_email", "expires_hours"),
    "account_reset": (*COMMON, "link", "token", "expires_minutes"),
    "email_changed": (*COMMON, "new_email"),
    "signup_existing": (*COMMON, "link", "token", "expires_minutes"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "invite": ("link", "invite_id"),
    "verify": ("link", "token"),
    "reset": ("link", "token"),
    "magic_link": ("link", "token"),
    "email_change": ("link", "token"),
    "account_reset": ("link", "token"),
    "email_changed": ("new_email",),
    "signup_existing": ("link", "token"),
}
PROJECT_KINDS = (
    "invite",
    "verify",
    "reset",
    "magic_link",
    "email_change",
    "email_changed",
    "signup_existing",
)


@dataclass(frozen=True)
class Template:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html><body style="font-family:sans-serif;max-width:560px;margin:auto">'
        f"<h2>{title}</h2>{body}"
        '<p style="color:#888;font-size:12px">If you did not ask for this, ignore this message.</p>'
        "</body></html>"
    )


_BUTTON = '<p><a href="{{ link }}" style="padding:8px 16px;background:#2563eb;color:#fff">%s</a></p>'
_CODE = "<p>Or enter this code: <code>{{ token }}</code></p>"

DEFAULTS: dict[str, Template] = {
    "invite": Template(
        "You are invited to {{ project_name }}",
        "You have been invited to join {{ project_name }} as {{ role }}.\n\n"
        "Sign in as {{ email }} and accept the invitation:\n{{ link }}\n\n"
        "Invitation id: {{ invite_id }}. It expires in {{ expires_hours }} hours.\n",
        _page(
            "Join {{ project_name }}",
            "<p>You have been invited to join <b>{{ project_name }}</b> as {{ role }}.</p>"
            "<p>Sign in as {{ email }} to accept.</p>"
            + _BUTTON % "Open the invitation"
            + "<p>Invitation id: <code>{{ invite_id }}</code>, expires in {{ expires_hours }} hours.</p>",
        ),
    ),
    "verify": Template(
        "Confirm your email for {{ project_name }}",
        "Confirm that {{ email }} is your address for {{ project_name }}:\n{{ link }}\n\n"
        "Or enter this code: {{ token }}\nIt expires in {{ expires_hours }} hours.\n",
        _page(
            "Confirm your email",
            "<p>Confirm that {{ email }} is your address for <b>{{ project_name }}</b>.</p>"
            + _BUTTON % "Confirm"
            + _CODE,
        ),
    ),
    "reset": Template(
        "Reset your {{ project_name }} password",
        "Someone asked to reset the password of {{ email }} for {{ project_name }}.\n"
        "Choose a new one here (within {{ expires_minutes }} minutes, once):\n{{ link }}\n\n"
        "Or enter this code: {{ token }}\n",
        _page(
            "Reset your password",
            "<p>Someone asked to reset the password of {{ email }} for <b>{{ project_name }}</b>.</p>"
            + _BUTTON % "Choose a new password"
            + _CODE
            + "<p>The link works once, within {{ expires_minutes }} minutes.</p>",
        ),
    ),
    "magic_link": Template(
        "Sign in to {{ project_name }}",
        "Sign in to {{ project_name }} as {{ email }} (within {{ expires_minutes }} minutes, once):\n"
        "{{ link }}\n\nOr enter this code: {{ token }}\n",
        _page(
            "Sign in",
            "<p>Sign in to <b>{{ project_name }}</b> as {{ email }}.</p>"
            + _BUTTON % "Sign in"
            + _CODE
            + "<p>The link works once, within {{ expires_minutes }} minutes.</p>",
        ),
    ),
    "email_change": Template(
        "Confirm your new email for {{ project_name }}",
        "Confirm {{ new_email }} as the new address of your {{ project_name }} account:\n{{ link }}\n\n"
        "Or enter this code: {{ token }}\nIt expires in {{ expires_hours }} hours.\n",
        _page(
            "Confirm your new email",
            "<p>Confirm {{ new_email }} as the new address of your <b>{{ project_name }}</b> account.</p>"
            + _BUTTON % "Confirm"
            + _CODE,
        ),
    ),
    "email_changed": Template(
        "Your {{ project_name }} email was changed",
        "The address of your {{ project_name }} account {{ email }} was changed to {{ new_email }}.\n"
        "If you did not do this, contact the team behind {{ project_name }} at once.\n",
        _page(
            "Your email was changed",
            "<p>The address of your <b>{{ project_name }}</b> account {{ email }} was changed to "
            "{{ new_email }}.</p>"
            "<p>If you did not do this, contact the team behind {{ project_name }} at once.</p>",
        ),
    ),
    "signup_existing": Template(
        "You already have a {{ project_name }} account",
        "Someone tried to sign up to {{ project_name }} as {{ email }}, which already has an account.\n"
        "If it was you and you forgot your password, choose a new one here "
        "(within {{ expires_minutes }} minutes, once):\n{{ link }}\n\nOr enter this code: {{ token }}\n",
        _page(
            "You already have an account",
            "<p>Someone tried to sign up to <b>{{ project_name }}</b> as {{ email }}, which already has "
            "an account.</p><p>If it was you and you forgot your password:</p>"
            + _BUTTON % "Choose a new password"
            + _CODE
            + "<p>The link works once, within {{ expires_minutes }} minutes.</p>",
        ),
    ),
    "account_reset": Template(
        "Reset your {{ app_name }} password",
        "Someone asked to reset the password of the {{ app_name }} account {{ email }}.\n"
        "Choose a new one here (within {{ expires_minutes }} minutes, once):\n{{ link }}\n\n"
        "Or enter this code: {{ token }}\n",
        _page(
            "Reset your password",
            "<p>Someone asked to reset the password of the {{ app_name }} account {{ email }}.</p>"
            + _BUTTON % "Choose a new password"
            + _CODE,
        ),
    ),
}

SAMPLE: dict[str, str] = {
    "project_name": "My <Project>",
    "email": "ada@example.com",
    "app_name": "Fluxbase",
    "link": "https://app.example.com/auth/callback?type=sample&token=fxm_sample",
    "token": "fxm_sample",
    "role": "developer",
    "invite_id": "inv_sample",
    "new_email": "ada.new@example.com",
    "expires_hours": "24",
    "expires_minutes": "60",
}


def check_kind(kind: str, *, project: bool = True) -> str:
    allowed = PROJECT_KINDS if project else tuple(FIELDS)
    if kind not in allowed:
        raise ValidationError(f"kind must be one of {', '.join(allowed)}.")
    return kind


def validate(kind: str, t: Template) -> Template:
    """Refuse a template with an unknown placeholder, without its link, or too long."""
    check_kind(kind)
    if not t.subject.strip() or len(t.subject) > MAX_SUBJECT or "\r" in t.subject or "\n" in t.subject:
        raise ValidationError(f"subject must be one line of 1..{MAX_SUBJECT} characters.")
    for name, body in (("subject", t.subject), ("text", t.text), ("html", t.html)):
        if name != "subject" and not 1 <= len(body) <= MAX_BODY:
            raise ValidationError(f"{name} must be 1..{MAX_BODY} characters.")
        unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(body)} - set(FIELDS[kind]))
        if unknown:
            raise ValidationError(
                f"{name} uses unknown placeholders {', '.join(unknown)}; "
                f"{kind} allows {', '.join(FIELDS[kind])}."
            )
    for name, body in (("text", t.text), ("html", t.html)):
        used = {m.group(1) for m in PLACEHOLDER.finditer(body)}
        if not used & set(REQUIRED[kind]):
            raise ValidationError(
                f"{name} must contain {{{{ {REQUIRED[kind][0]} }}}}: it is what the message is for."
            )
    return t


def _fill(template: str, values: Mapping[str, str], escape: bool) -> str:
    def one(m: re.Match[str]) -> str:
        v = values.get(m.group(1), "")
        return html.escape(v, quote=True) if escape else v

    return PLACEHOLDER.sub(one, template)


def render(t: Template, values: Mapping[str, str]) -> Rendered:
    subject = _fill(t.subject, {k: " ".join(v.split()) for k, v in values.items()}, escape=False)
    return Rendered(subject[:998], _fill(t.text, values, escape=False), _fill(t.html, values, escape=True))
