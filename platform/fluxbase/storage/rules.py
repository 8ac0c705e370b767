"""Storage rules: bucket and file names, S3 keys, content types, cursors, end-user rules (pure).

Every S3 key is `<projectId>/<bucketId>/<name>`; the checks here are what keep a name inside
its prefix and a caller's s3Key inside the caller's project.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
import uuid
from dataclasses import dataclass, replace

from fluxbase.errors import ScopeMismatch, ValidationError

MAX_NAME_BYTES = 960  # keeps <projectId>/<bucketUuid>/<name> under S3's 1024-byte key limit
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_BUCKET_NAME = re.compile(r"[a-z0-9_-]{1,63}")
_MIME_PATTERN = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*)")
_TCHARS = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"  # RFC 9110 token
_CONTENT_TYPE = re.compile(rf"{_TCHARS}/{_TCHARS}(\s*;\s*{_TCHARS}=({_TCHARS}|\"[^\"\x00-\x1f\x7f]*\"))*")
# Bidirectional overrides can disguise a name ("gpj.exe" shown as "exe.jpg").
_BIDI = {
    "\u200e",
    "\u200f",
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
}


def check_bucket_name(name: object) -> str:
    """Bucket names: lowercase alphanumeric, hyphens, underscores, 1 to 63 characters, not a UUID."""
    if not isinstance(name, str) or not _BUCKET_NAME.fullmatch(name):
        raise ValidationError(
            f"Invalid bucket name {name!r}: use 1 to 63 characters of lowercase letters, digits, hyphens "
            "and underscores."
        )
    if as_uuid(name) is not None:
        raise ValidationError(
            f"Invalid bucket name {name!r}: a bucket name must not look like a UUID, "
            "because bucketId accepts either."
        )
    return name


def check_object_name(name: object) -> str:
    """File names: a relative path of 1 to 960 UTF-8 bytes; no '.', '..' or empty segments, no control
    characters, no backslashes, no leading '/'."""
    if not isinstance(name, str) or not name:
        raise ValidationError("A file name is required.")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValidationError(f"Invalid file name: at most {MAX_NAME_BYTES} bytes (UTF-8).")
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI:
            raise ValidationError(f"Invalid file name {name!r}: control characters are not allowed.")
    if "\\" in name:
        raise ValidationError(f"Invalid file name {name!r}: use '/' to separate folders, not '\\'.")
    if name.startswith("/"):
        raise ValidationError(f"Invalid file name {name!r}: absolute paths are not allowed.")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise ValidationError(
                f"Invalid file name {name!r}: empty, '.' and '..' path segments are not allowed."
            )
    return name


def check_content_type(value: str | None) -> str:
    if value is None or not value.strip():
        return DEFAULT_CONTENT_TYPE
    value = value.strip()
    if len(value) > 255 or not _CONTENT_TYPE.fullmatch(value):
        raise ValidationError(f"Invalid Content-Type {value[:100]!r}.")
    return value


def check_mime_patterns(items: list[str] | None) -> list[str] | None:
    """Normalise a bucket's allowed MIME types (exact types or 'type/*'); an empty list means any."""
    if items is None:
        return None
    if len(items) > 100:
        raise ValidationError("allowedMimeTypes may list at most 100 types.")
    out = []
    for item in items:
        if not isinstance(item, str) or not _MIME_PATTERN.fullmatch(item.strip().lower()):
            raise ValidationError(f"Invalid MIME type pattern {item!r}: use e.g. 'image/png' or 'image/*'.")
        out.append(item.strip().lower())
    return out or None


def mime_allowed(allowed: list[str] | None, content_type: str) -> bool:
    if not allowed:
        return True
    base = content_type.split(";", 1)[0].strip().lower()
    major = base.split("/", 1)[0]
    return any(p == base or p == f"{major}/*" for p in allowed)


def object_key(project_id: str, bucket_id: str, name: str) -> str:
    return f"{project_id}/{bucket_id}/{name}"


def as_uuid(value: object) -> str | None:
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def parse_object_key(project_id: str, s3_key: object) -> str:
    """The canonical form of an s3Key the caller sent, refusing keys outside the caller's project."""
    if not isinstance(s3_key, str) or not s3_key:
        raise ValidationError("s3Key is required.")
    owner, _, rest = s3_key.partition("/")
    if owner != project_id:
        raise ScopeMismatch("This s3Key does not belong to the project given in projectId.")
    bucket, _, name = rest.partition("/")
    bucket_id = as_uuid(bucket)
    if bucket_id is None:
        raise ValidationError("s3Key must look like <projectId>/<bucketId>/<name>.")
    return object_key(project_id, bucket_id, check_object_name(name))


def encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationError("cursor is not valid; pass the nextCursor of a previous page.") from None


def parse_bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ValidationError(f"{name} must be true or false.")


def size_text(n: int) -> str:
    return f"{n} bytes ({n / (1024 * 1024):.1f} MiB)"


# -- end-user rules (sql/0014, docs/storage-access.md) --------------------------------------------

END_USER_OPS = ("list", "read", "insert", "update", "delete")
END_USER_RULES = ("none", "authenticated", "owner", "userFolder")


@dataclass(frozen=True)
class EndUserRules:
    """What an end user may do with a bucket's files, one rule per operation."""

    list: str = "none"
    read: str = "none"
    insert: str = "none"
    update: str = "none"
    delete: str = "none"

    def rule(self, op: str) -> str:
        rule: str = getattr(self, op)
        return rule

    def out(self) -> dict[str, str]:
        return {op: self.rule(op) for op in END_USER_OPS}

    @property
    def any_open(self) -> bool:
        return any(self.rule(op) != "none" for op in END_USER_OPS)


def check_end_user_rules(value: object, base: EndUserRules | None = None) -> EndUserRules:
    """Validate an `endUserAccess` object; operations it leaves out keep `base`'s rule ('none')."""
    if not isinstance(value, dict):
        raise ValidationError("endUserAccess must be an object of operation: rule.")
    changes = {}
    for op, rule in value.items():
        if op not in END_USER_OPS:
            raise ValidationError(f"endUserAccess: unknown operation {op!r} (use {', '.join(END_USER_OPS)}).")
        if rule not in END_USER_RULES:
            raise ValidationError(
                f"endUserAccess.{op}: unknown rule {rule!r} (use {', '.join(END_USER_RULES)})."
            )
        changes[op] = rule
    return replace(base or EndUserRules(), **changes)


def end_user_allows(rule: str, uid: str, name: str, owner_uid: str | None) -> bool:
    """Whether `rule` lets end user `uid` act on the file `name` owned by `owner_uid`.

    `end_user_sql` is the same predicate in SQL; keep the two in step.
    """
    if rule == "authenticated":
        return True
    if rule == "owner":
        return owner_uid is not None and owner_uid == uid
    if rule == "userFolder":
        # The first segment is the id itself: an id with a '/' would own other ids' folders.
        folder, slash, _ = name.partition("/")
        return bool(slash) and bool(uid) and "/" not in uid and folder == uid
    return False


def end_user_sql(rule_column: str, uid_param: str, alias: str = "o") -> str:
    """`end_user_allows` as an SQL predicate over `<alias>.owner_uid` and `<alias>.name`."""
    return (
        f"(CASE {rule_column} WHEN 'authenticated' THEN true "
        f"WHEN 'owner' THEN {alias}.owner_uid IS NOT NULL AND {alias}.owner_uid = {uid_param} "
        f"WHEN 'userFolder' THEN strpos({uid_param}, '/') = 0 AND {uid_param} <> '' "
        f"AND strpos({alias}.name, '/') > 0 AND split_part({alias}.name, '/', 1) = {uid_param} "
        "ELSE false END)"
    )
