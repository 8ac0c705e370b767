"""Multi-statement SQL scripts (migrations, imports): split into statements and vet each one.

Scripts run on the tenant's admin connection inside one transaction. A top-level COMMIT,
ROLLBACK or SAVEPOINT would end or split that transaction, so every statement's leading keyword
is checked before anything is sent. The splitter understands what can hide a `;`: quoted
strings ('', E'' with backslash escapes), quoted identifiers, dollar quotes and comments
(nested block comments included); anything unterminated is refused rather than guessed.
"""

from __future__ import annotations

import re

from fluxbase.services.sql import DENIED, leading_keyword

_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_SET_AUTH = re.compile(r"\s*SET\s+(SESSION\s+|LOCAL\s+)?(AUTHORIZATION|ROLE|SESSION\s+AUTHORIZATION)\b", re.I)


class ScriptError(ValueError):
    """The script cannot be split safely or contains a statement that is not allowed."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _ident_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


def split_statements(script: str) -> list[str]:
    """The script's statements (without the trailing `;`), empty ones dropped."""
    out: list[str] = []
    i, n, start = 0, len(script), 0
    while i < n:
        c = script[i]
        if c == "'":
            escapes = i > 0 and script[i - 1] in "eE" and (i < 2 or not _ident_char(script[i - 2]))
            i += 1
            while True:
                if i >= n:
                    raise ScriptError("unterminated string literal")
                if escapes and script[i] == "\\":
                    i += 2
                    continue
                if script[i] == "'":
                    if i + 1 < n and script[i + 1] == "'":
                        i += 2
                        continue
                    i += 1
                    break
                i += 1
        elif c == '"':
            j = i + 1
            while True:
                j = script.find('"', j)
                if j < 0:
                    raise ScriptError("unterminated quoted identifier")
                if j + 1 < n and script[j + 1] == '"':
                    j += 2
                    continue
                break
            i = j + 1
        elif c == "$" and (i == 0 or not _ident_char(script[i - 1])):
            m = _TAG.match(script, i)
            if m is None:
                i += 1
                continue
            end = script.find(m.group(0), m.end())
            if end < 0:
                raise ScriptError(f"unterminated dollar-quoted string {m.group(0)}")
            i = end + len(m.group(0))
        elif script.startswith("--", i):
            j = script.find("\n", i)
            i = n if j < 0 else j + 1
        elif script.startswith("/*", i):
            depth, i = 1, i + 2
            while depth:
                if i >= n:
                    raise ScriptError("unterminated block comment")
                if script.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif script.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == ";":
            out.append(script[start:i])
            i += 1
            start = i
        else:
            i += 1
    out.append(script[start:])
    return [s for s in out if leading_keyword(s) or not _only_comments(s)]


def _only_comments(stmt: str) -> bool:
    s = re.sub(r"--[^\n]*", "", stmt)
    s = re.sub(r"/\*.*?\*/", "", s, flags=re.S)
    return not s.strip(" \t\r\n(;")


def check_statement(stmt: str, index: int) -> None:
    """Refuse transaction control, session-state commands and role switches."""
    keyword = leading_keyword(stmt)
    if keyword in DENIED:
        raise ScriptError(
            f"statement {index}: {keyword} is not allowed ({DENIED[keyword]}): "
            "the whole script runs as one transaction",
            index,
        )
    if keyword == "SET" and _SET_AUTH.match(stmt.lstrip(" (\t\r\n")):
        raise ScriptError(f"statement {index}: switching roles is not allowed", index)
    if keyword == "VACUUM":
        raise ScriptError(
            f"statement {index}: VACUUM cannot run in a transaction; use the vacuum endpoint", index
        )
