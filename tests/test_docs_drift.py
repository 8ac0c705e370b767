"""The README says what the code does: its tables of settings, error codes and WebSocket messages
are compared with the code, and the snippet copies in tests/js/ with the Integration Guide.

Each check names the row to add, remove or fix. The code is the source: a new setting, error code
or message type fails here until the README has its row, and a row the code no longer backs fails
until it is removed. Rows are matched by name, so tables may be reordered or grow freely.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluxbase import errors
from fluxbase.config import ConfigError, load_settings
from support import ROOT

README = ROOT / "README.md"
# A variable's name; not the prefix of a family such as `FLUXBASE_STORAGE_*`.
VAR = re.compile(r"FLUXBASE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)")

# The "Fluxbase Integration Guide" is not part of the repository: the team keeps it beside the
# checkout. Where it is absent (any other clone) the comparison skips and says why.
GUIDE = Path(
    os.environ.get("FLUXBASE_REFERENCE_GUIDE")
    or ROOT.parent / "shared" / "reference" / "002_c3226fd7e0f4349b.txt"
)
GUIDE_SNIPPETS = ("fluxbase.js", "realtime.js", "webhook-handler.js")


# -- reading the README's tables ---------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One markdown table: the headings it sits under, its header cells and its rows."""

    section: tuple[str, ...]
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def _cells(line: str) -> tuple[str, ...]:
    # Split on pipes that are not escaped (`read\|readwrite` stays one cell).
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    return tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner))


def readme_tables(text: str) -> list[Table]:
    tables: list[Table] = []
    headings: list[str] = []
    block: list[str] = []
    fenced = False

    def flush() -> None:
        if len(block) >= 2 and set(block[1].replace("|", "").strip()) <= set("-: "):
            rows = tuple(_cells(r) for r in block[2:])
            tables.append(Table(tuple(headings), _cells(block[0]), rows))
        block.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            block.append(line)
            continue
        flush()
        m = re.match(r"(#+) (.*)", line)
        if m and not fenced:
            level = len(m.group(1))
            del headings[level - 1 :]
            headings.extend([""] * (level - 1 - len(headings)))
            headings.append(m.group(2).strip())
    flush()
    return tables


def tables_with(header0: str, *, under: str | None = None) -> list[Table]:
    found = [
        t
        for t in readme_tables(README.read_text())
        if t.header and t.header[0] == header0 and (under is None or under in t.section)
    ]
    assert found, f"README.md has no table whose first column is {header0!r}" + (
        f" under '{under}'" if under else ""
    )
    return found


# -- settings ----------------------------------------------------------------------------------

REQUIRED = {
    "FLUXBASE_SECRET_KEY": "s" * 48,
    "FLUXBASE_DATABASE_URL": "postgresql://fluxbase:x@127.0.0.1:5432/fluxbase",
    "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:8333",
    "FLUXBASE_S3_ACCESS_KEY": "access",
    "FLUXBASE_S3_SECRET_KEY": "secret",
}


class _Recording(dict[str, str]):
    """An environment that remembers which variables load_settings asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key, default=None):  # type: ignore[no-untyped-def, override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)


def settings_in_code() -> set[str]:
    """Every variable load_settings reads, plus any FLUXBASE_* name config.py spells out."""
    env = _Recording(REQUIRED)
    load_settings(env)
    source = (ROOT / "platform" / "fluxbase" / "config.py").read_text()
    return {v for v in env.asked if v.startswith("FLUXBASE_")} | set(VAR.findall(source))


def settings_rows() -> dict[str, list[tuple[str, ...]]]:
    """README's configuration tables (required, optional): variable → its rows."""
    rows: dict[str, list[tuple[str, ...]]] = {}
    for table in tables_with("Variable", under="Configuration"):
        if "`fluxbase dev` only" in table.section:
            continue
        for row in table.rows:
            for name in VAR.findall(row[0]):
                rows.setdefault(name, []).append(row)
    return rows


def test_every_setting_has_exactly_one_readme_row() -> None:
    code, readme = settings_in_code(), settings_rows()
    problems = [f"no row for {n} (read by fluxbase.config)" for n in sorted(code - readme.keys())]
    problems += [f"a row for {n}, which fluxbase.config never reads" for n in sorted(readme.keys() - code)]
    problems += [f"{len(r)} rows for {n}" for n, r in sorted(readme.items()) if len(r) > 1]
    assert not problems, "README 'Configuration':\n" + "\n".join(problems)


def _literal_default(cell: str) -> str | None:
    """The cell's leading `literal`, if it is one (not prose such as *(none)* or a placeholder)."""
    m = re.match(r"`([^`]*)`", cell)
    if m is None or "<" in m.group(1):
        return None
    return m.group(1)


def test_readme_defaults_are_the_code_defaults() -> None:
    baseline = load_settings(REQUIRED)
    wrong: list[str] = []
    checked = 0
    for name, rows in settings_rows().items():
        for row in rows:
            if len(row) < 3 or name in REQUIRED:
                continue
            default = _literal_default(row[1])
            if default is None:
                continue
            checked += 1
            # Setting a variable to its documented default must change nothing.
            try:
                same = load_settings({**REQUIRED, name: default}) == baseline
            except ConfigError as exc:
                wrong.append(f"{name}: README default {default!r} is refused ({exc})")
                continue
            if not same:
                wrong.append(f"{name}: README default {default!r} is not the code's default")
    assert checked >= 30, f"only {checked} defaults were read from the README; has the table changed shape?"
    assert not wrong, "\n".join(wrong)


def _flux_vars_in(paths: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in paths:
        for name in VAR.findall(path.read_text()):
            found.setdefault(name, path)
    return found


def test_every_variable_the_code_reads_is_in_the_readme_and_back() -> None:
    """Beyond the tables: CLI, dev-stack and test variables may be described in prose, but every
    FLUXBASE_* name in the code appears in the README, and every one the README names exists."""
    sources = sorted((ROOT / "platform").rglob("*.py")) + sorted((ROOT / "realtime").rglob("*.py"))
    in_code = _flux_vars_in(sources)
    in_tests = _flux_vars_in(sorted((ROOT / "tests").glob("*.py")))
    # Compose-only variables (replica counts, the TLS folder) are read by compose.yaml itself.
    in_compose = _flux_vars_in([ROOT / "compose.yaml"])
    readme = set(VAR.findall(README.read_text()))
    undocumented = sorted(set(in_code) - readme)
    unknown = sorted(readme - set(in_code) - set(in_tests) - set(in_compose))
    assert not undocumented, "README never mentions " + ", ".join(
        f"{n} ({in_code[n].relative_to(ROOT)})" for n in undocumented
    )
    assert not unknown, f"README names variables no code reads: {unknown}"


def test_dev_only_rows_are_read_outside_the_settings() -> None:
    (table,) = [
        t for t in tables_with("Variable", under="Configuration") if "`fluxbase dev` only" in t.section
    ]
    dev_vars = {n for row in table.rows for n in VAR.findall(row[0])}
    devstack = _flux_vars_in(sorted((ROOT / "platform" / "fluxbase" / "devstack").rglob("*.py")))
    read_by_devstack_only = set(devstack) - settings_in_code()
    assert dev_vars == read_by_devstack_only, (
        f"README '`fluxbase dev` only' rows: {sorted(dev_vars)}; variables only the dev stack reads: "
        f"{sorted(read_by_devstack_only)}"
    )


# -- error codes -------------------------------------------------------------------------------


def _subclasses(cls: type[errors.FluxbaseError]) -> list[type[errors.FluxbaseError]]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def codes_in_catalog() -> dict[str, set[int]]:
    codes: dict[str, set[int]] = {errors.FluxbaseError.code: {errors.FluxbaseError.status}}
    for cls in _subclasses(errors.FluxbaseError):
        if cls.__module__ == errors.__name__:
            codes.setdefault(cls.code, set()).add(cls.status)
    return codes


EDGE = ROOT / "platform" / "fluxbase" / "http" / "edge.py"


def codes_of_the_edge() -> set[str]:
    """Codes the HTTP edge writes itself for Litestar's own exceptions (`code, msg = "X", …`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(EDGE.read_text())):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = zip(target.elts, node.value.elts, strict=False)
            else:
                pairs = zip([target], [node.value], strict=False)
            for name, value in pairs:
                if isinstance(name, ast.Name) and name.id == "code":
                    found |= _strings(value)
                    # `code = NotFound.code`: the catalog class's own code
                    if (
                        isinstance(value, ast.Attribute)
                        and value.attr == "code"
                        and isinstance(value.value, ast.Name)
                    ):
                        cls = getattr(errors, value.value.id, None)
                        found.add(cls.code if cls is not None else f"<unknown class {value.value.id}>")
    return found


# The guide's SQL endpoints answer statement failures with HTTP 200 and success: false.
SQL_ENDPOINT_STATUS = 200


def test_error_table_matches_the_catalog() -> None:
    (table,) = tables_with("Code")
    assert table.header[:2] == ("Code", "HTTP"), table.header
    readme: dict[str, list[set[int]]] = {}
    for row in table.rows:
        code = row[0].strip("` ")
        readme.setdefault(code, []).append({int(s) for s in re.findall(r"\d{3}", row[1])})
    catalog = codes_in_catalog()
    edge = codes_of_the_edge() - catalog.keys()
    assert "METHOD_NOT_ALLOWED" in edge or "METHOD_NOT_ALLOWED" in catalog
    problems = [f"missing row: `{c}` (written by fluxbase.http.edge)" for c in sorted(edge - readme.keys())]
    problems += [
        f"missing row: `{c}` | {'/'.join(map(str, sorted(catalog[c])))}"
        for c in sorted(catalog.keys() - readme.keys())
    ]
    problems += [
        f"stale row: `{c}` is not in fluxbase.errors" for c in sorted(readme.keys() - catalog.keys() - edge)
    ]
    problems += [f"row `{c}` appears {len(v)} times" for c, v in sorted(readme.items()) if len(v) > 1]
    for code in sorted(catalog.keys() & readme.keys()):
        shown = readme[code][0]
        if catalog[code] - shown:
            problems.append(f"row `{code}` lacks HTTP {sorted(catalog[code] - shown)} (fluxbase.errors)")
        if shown - catalog[code] - {SQL_ENDPOINT_STATUS}:
            problems.append(
                f"row `{code}` shows HTTP {sorted(shown - catalog[code])}, which fluxbase.errors never uses"
            )
    assert not problems, "README 'Errors' table:\n" + "\n".join(problems)


def test_every_code_the_edge_writes_is_in_the_catalog() -> None:
    """The edge renders Litestar's own exceptions itself; each code it writes is a catalog code
    (so OpenAPI, the clients and the README table know it), with the status the edge answers."""
    catalog = codes_in_catalog()
    assert codes_of_the_edge() >= {"NOT_FOUND", "METHOD_NOT_ALLOWED", "PAYLOAD_TOO_LARGE"}
    assert codes_of_the_edge() - catalog.keys() == set()
    assert catalog["METHOD_NOT_ALLOWED"] == {405}


# -- WebSocket messages ------------------------------------------------------------------------

REALTIME = ROOT / "realtime" / "fluxbase_realtime"
# The event messages (db_event, schema_update, broadcast) are built by PostgreSQL.
MESSAGE_SQL = ROOT / "platform" / "fluxbase" / "services" / "realtime.py"


def _is_type_lookup(node: ast.AST) -> bool:
    """`msg.get("type")` or `msg["type"]`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "type"
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value == "type"
    )


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {s for e in node.elts for s in _strings(e)}
    return set()


def messages_in_code() -> tuple[set[str], set[str]]:
    """(types the service dispatches on, types it sends)."""
    received: set[str] = set()
    sent: set[str] = set()
    for path in sorted(REALTIME.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {
            t.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and _is_type_lookup(node.value)
            for t in node.targets
            if isinstance(t, ast.Name)
        }

        def is_kind(n: ast.AST, names: set[str] = names) -> bool:
            return (isinstance(n, ast.Name) and n.id in names) or _is_type_lookup(n)

        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and is_kind(node.left):
                for comparator in node.comparators:
                    received |= _strings(comparator)
            elif isinstance(node, ast.Match) and is_kind(node.subject):
                for case in node.cases:
                    for pattern in ast.walk(case.pattern):
                        if isinstance(pattern, ast.MatchValue):
                            received |= _strings(pattern.value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "type":
                        sent |= _strings(value)
    sent |= set(re.findall(r"'type',\s*'(\w+)'", MESSAGE_SQL.read_text()))
    return received, sent


def test_websocket_table_matches_the_service() -> None:
    (table,) = tables_with("client → server")
    columns = {"client → server": set[str](), "server → client": set[str]()}
    for row in table.rows:
        for heading, cell in zip(table.header, row, strict=True):
            columns[heading] |= set(re.findall(r'"type":\s*"(\w+)"', cell))
    received, sent = messages_in_code()
    assert received >= {"subscribe", "ping"} and sent >= {"subscribed", "db_event"}, (received, sent)
    problems = []
    for heading, shown, code in (
        ("client → server", columns["client → server"], received),
        ("server → client", columns["server → client"], sent),
    ):
        problems += [f"{heading}: no row for {t!r}" for t in sorted(code - shown)]
        problems += [f"{heading}: {t!r} is not a message the service knows" for t in sorted(shown - code)]
    assert not problems, "README 'Realtime' message table:\n" + "\n".join(problems)


# -- the Integration Guide's snippets ----------------------------------------------------------


@pytest.mark.skipif(
    not GUIDE.is_file(),
    reason=f"the Integration Guide is not at {GUIDE} (it is not in the repository; "
    "set FLUXBASE_REFERENCE_GUIDE to its path to compare the snippet copies in tests/js/)",
)
@pytest.mark.parametrize("snippet", GUIDE_SNIPPETS)
def test_snippet_copy_matches_the_guide(snippet: str) -> None:
    """tests/js/ holds the guide's snippets verbatim; the suite runs those copies against the server."""
    copy = (ROOT / "tests" / "js" / snippet).read_text().strip()
    assert copy in GUIDE.read_text(), f"tests/js/{snippet} differs from the guide's snippet"


def test_the_defaults_check_sees_a_changed_value() -> None:
    """Settings compare by value, so a README default that differs from the code's is caught."""
    baseline = load_settings(REQUIRED)
    assert load_settings(dict(REQUIRED)) == baseline
    assert load_settings({**REQUIRED, "FLUXBASE_API_PORT": "8081"}) != baseline
    assert load_settings({**REQUIRED, "FLUXBASE_RUN_WORKER_IN_API": "true"}) != baseline


# -- links between the docs --------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
