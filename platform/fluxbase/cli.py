"""The `fluxbase` command: dev, api, realtime, worker, migrate and headless setup commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

from fluxbase.config import ConfigError, Settings, load_settings


def _environ(args: argparse.Namespace | None = None) -> dict[str, str]:
    """The process environment, plus a running dev stack's when the command has no database of
    its own configured (or `--dev` asks for it)."""
    from fluxbase.devstack import discover

    environ = dict(os.environ)
    if args is None:  # the services (api, realtime, worker) are configured explicitly
        return environ
    want = bool(getattr(args, "dev", False))
    if want or not environ.get("FLUXBASE_DATABASE_URL"):
        stack = discover.find(environ, required=want)
        if stack is not None:
            environ.update(stack.env)
    return environ


def _settings(args: argparse.Namespace | None = None) -> Settings:
    from fluxbase.devstack import discover

    environ = _environ(args)
    try:
        return load_settings(environ)
    except ConfigError as exc:
        hint = discover.hint(environ)
        if hint is None:
            raise
        # Say what is missing and how to reach the dev stack; never "generate a new secret".
        raise ConfigError(f"{str(exc).split('. ')[0].rstrip('.')}. {hint}") from None


def _setup_logging(settings: Settings) -> None:
    from fluxbase.config import unknown_variables
    from fluxbase.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("fluxbase.config")
    for name, close in unknown_variables(os.environ):
        hint = f" (did you mean {close}?)" if close else ""
        log.warning("unknown setting %s is ignored%s", name, hint)


MIGRATE_CONNECT_WITHIN_S = 60.0  # how long `migrate` waits for PostgreSQL to accept connections


async def _migrate(settings: Settings, within_s: float = MIGRATE_CONNECT_WITHIN_S) -> list[str]:
    """Apply the migrations; while PostgreSQL does not accept connections yet (a container
    starting beside it), retry with exponential backoff for up to `within_s` seconds."""
    import asyncpg

    from fluxbase.db.migrate import migrate_database

    log = logging.getLogger("fluxbase.migrate")
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    delay = 0.25
    while True:
        try:
            return await migrate_database(settings)
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            if loop.time() + delay > give_up:
                raise
            log.warning("database not reachable (%s), retrying in %.2fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings)
    applied = asyncio.run(_migrate(settings))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    _setup_logging(settings)
    from fluxbase.devstack.procs import ensure_port_free

    host = args.host or settings.http.host
    port = args.port or settings.http.port
    ensure_port_free(host, port, "API", "FLUXBASE_API_PORT")
    if not args.no_migrate:
        asyncio.run(_migrate(settings))
    workers = args.workers or settings.http.workers
    with _shared_metrics_dir(settings.http.metrics_dir, workers):
        _run_uvicorn(uvicorn, args, settings, host, port, workers)
    return 0


@contextlib.contextmanager
def _shared_metrics_dir(given: str, workers: int) -> Iterator[None]:
    """With several workers, a directory where they share their metrics (fluxbase.metrics),
    passed to them as FLUXBASE_API_METRICS_DIR: the one given, emptied of the last run's files,
    or a private temporary one removed at exit."""
    if not given and workers <= 1:
        yield
        return
    from fluxbase.metrics import SharedStore

    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob(f"*{SharedStore.SUFFIX}"):
            old.unlink(missing_ok=True)
        yield
        return
    directory = Path(tempfile.mkdtemp(prefix="fluxbase-metrics-"))
    os.environ["FLUXBASE_API_METRICS_DIR"] = str(directory)
    try:
        yield
    finally:
        os.environ.pop("FLUXBASE_API_METRICS_DIR", None)
        shutil.rmtree(directory, ignore_errors=True)


def _run_uvicorn(
    uvicorn: Any, args: argparse.Namespace, settings: Settings, host: str, port: int, workers: int
) -> None:
    uvicorn.run(
        "fluxbase.http.asgi:create_with_request_log"
        if args.request_log
        else "fluxbase.http.asgi:create_from_env",
        factory=True,
        # uvicorn's httptools protocol, answering POST /api/execute-sql without ASGI
        http="fluxbase.http.protocol:SqlHttpProtocol",
        host=host,
        port=port,
        workers=workers if workers > 1 else None,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        # SIGTERM: uvicorn closes the listener at once (new connections are refused), lets the
        # requests in flight finish, and without a bound would wait for them forever (a container
        # is then SIGKILLed after its grace period, cutting every one). Past the drain time the
        # remaining requests are cancelled and the process exits. A float works (asyncio.timeout).
        timeout_graceful_shutdown=settings.http.drain_s,  # type: ignore[arg-type]
    )


def _trace_realtime() -> None:
    from fluxbase import tracing

    tracing.setup(os.environ, "fluxbase-realtime")


def cmd_realtime(args: argparse.Namespace) -> int:
    from fluxbase.devstack.procs import ensure_port_free
    from fluxbase_realtime.server import serve

    settings = _settings()
    _setup_logging(settings)
    host = args.host or settings.realtime.host
    port = args.port or settings.realtime.port
    if args.reuse_port:  # one worker of `--workers N`: its supervisor checked the port
        _trace_realtime()
        run_loop(serve(settings, host, port, reuse_port=True), args.loop)
        return 0
    ensure_port_free(host, port, "realtime service", "FLUXBASE_REALTIME_PORT")
    workers = args.workers or settings.realtime.workers
    if workers > 1:
        from fluxbase_realtime.workers import supervise

        return supervise(host, port, workers, args.loop)
    _trace_realtime()
    run_loop(serve(settings, host, port), args.loop)
    return 0


def run_loop(main: Coroutine[Any, Any, None], loop: str = "asyncio") -> None:
    """Run `main` on asyncio's own loop, or on uvloop (it comes with uvicorn[standard]) when
    asked for (`uvloop`, or `auto` where installed). bench/realtime.py --loops asyncio,uvloop
    compares them: with the fan-out by class, uvloop was not cheaper per delivery (1.29 against
    1.08 us, one run each at load 25), so asyncio stays the default."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)


def cmd_worker(_: argparse.Namespace) -> int:
    import signal

    from fluxbase.worker import run_worker

    settings = _settings()
    _setup_logging(settings)
    from fluxbase import tracing

    tracing.setup(os.environ, "fluxbase-worker")

    async def main() -> None:
        # SIGTERM (a container stopping) and SIGINT: start nothing new, let deliveries in flight
        # finish and be written down (WebhookWorker.run), then exit.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    asyncio.run(main())
    return 0


def cmd_dev(_: argparse.Namespace) -> int:
    from fluxbase.devstack.runner import run_dev

    return run_dev(os.environ)


async def _with_db(settings: Settings, fn: Any) -> Any:
    import asyncpg

    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    try:
        return await fn(pool)
    finally:
        await pool.close()


def cmd_create_admin(args: argparse.Namespace) -> int:
    from fluxbase.services import accounts

    settings = _settings(args)
    password = args.password or os.environ.get("FLUXBASE_ADMIN_PASSWORD") or getpass.getpass("Password: ")

    async def go(db: Any) -> Any:
        return await accounts.create_user(
            db, args.email, password, args.display_name or "", instance_admin=True
        )

    user = asyncio.run(_with_db(settings, go))
    print(json.dumps({"id": user.id, "email": user.email, "isInstanceAdmin": True}))
    return 0


def cmd_create_project(args: argparse.Namespace) -> int:
    from fluxbase.services import projects

    settings = _settings(args)

    async def go(db: Any) -> Any:
        owner = await db.fetchval("SELECT id FROM fluxbase.users WHERE lower(email) = lower($1)", args.owner)
        if owner is None:
            raise SystemExit(f"no account with email {args.owner}")
        return await projects.create_project(db, settings, owner, args.name)

    project = asyncio.run(_with_db(settings, go))
    print(json.dumps({"id": project.id, "name": project.name}))
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from fluxbase.services import apikeys
    from fluxbase.services.access import Principal, ProjectAccess, load_project

    settings = _settings(args)

    async def go(db: Any) -> Any:
        project = await load_project(db, args.project)
        access = ProjectAccess(project, Principal(), args.scope, "admin")
        return await apikeys.create_key(
            db, access, name=args.name, scope=args.scope, expires_in_days=args.expires_in_days
        )

    raw, key = asyncio.run(_with_db(settings, go))
    print(json.dumps({"key": raw, "id": key.id, "scope": key.scope, "projectId": key.project_id}))
    return 0


def _remote(fn_name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import httpx

        from fluxbase import remote

        try:
            return int(getattr(remote, fn_name)(args))
        except remote.RemoteError as exc:
            print(f"fluxbase: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # includes httpx transport errors' causes: unreachable server, bad path
            print(f"fluxbase: {exc}", file=sys.stderr)
            return 1
        except httpx.TransportError as exc:
            print(f"fluxbase: cannot reach the API: {exc}", file=sys.stderr)
            return 1

    return run


def _dev_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dev",
        action="store_true",
        help="use the running `fluxbase dev` of this checkout (found by itself when nothing else is set)",
    )


def _remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="API base URL (or FLUXBASE_URL; default: the running dev stack)")
    p.add_argument("--key", help="API key or session token (or FLUXBASE_KEY; default: the dev stack's)")
    _dev_arg(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxbase", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "dev", help="embedded PostgreSQL + S3, api, realtime and worker on one machine"
    ).set_defaults(fn=cmd_dev)
    api = sub.add_parser("api", help="run the HTTP API (production)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--workers", type=int, help="worker processes (default FLUXBASE_API_WORKERS or 1)")
    api.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations at start")
    api.add_argument(
        "--request-log",
        action="store_true",
        help="one line per request on stderr: method, path, status, ms, project, request id (as in dev)",
    )
    api.set_defaults(fn=cmd_api)
    rt = sub.add_parser("realtime", help="run the realtime WebSocket service")
    rt.add_argument("--host")
    rt.add_argument("--port", type=int)
    rt.add_argument(
        "--workers", type=int, help="processes on the one port (default FLUXBASE_REALTIME_WORKERS or 1)"
    )
    rt.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    rt.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="asyncio",
        help="event loop (auto: uvloop where installed); uvloop measured no cheaper per delivery",
    )
    rt.set_defaults(fn=cmd_realtime)
    sub.add_parser("worker", help="run webhook delivery and housekeeping").set_defaults(fn=cmd_worker)
    mig = sub.add_parser("migrate", help="apply pending SQL migrations")
    _dev_arg(mig)
    mig.set_defaults(fn=cmd_migrate)
    ca = sub.add_parser("create-admin", help="create an instance admin account")
    ca.add_argument("--email", required=True)
    ca.add_argument("--password", help="or FLUXBASE_ADMIN_PASSWORD, or prompted")
    ca.add_argument("--display-name")
    _dev_arg(ca)
    ca.set_defaults(fn=cmd_create_admin)
    cp = sub.add_parser("create-project", help="create a project owned by an existing account")
    cp.add_argument("--owner", required=True, help="owner's email")
    cp.add_argument("--name", required=True)
    _dev_arg(cp)
    cp.set_defaults(fn=cmd_create_project)
    ck = sub.add_parser("create-key", help="mint an API key for a project (printed once)")
    ck.add_argument("--project", required=True)
    ck.add_argument("--scope", choices=["read", "readwrite", "admin"], default="admin")
    ck.add_argument("--name", default="cli")
    ck.add_argument("--expires-in-days", type=int)
    _dev_arg(ck)
    ck.set_defaults(fn=cmd_create_key)
    mg = sub.add_parser("migrations", help="project schema migrations over the HTTP API")
    mg_sub = mg.add_subparsers(dest="migrations_command", required=True)
    push = mg_sub.add_parser("push", help="apply a folder of NNNN_name.sql files in order")
    push.add_argument("dir")
    push.add_argument("--project", required=True)
    _remote_args(push)
    push.set_defaults(fn=_remote("push_migrations"))
    ex = sub.add_parser("export", help="download a project's SQL dump (psql can load it)")
    ex.add_argument("--project", required=True)
    ex.add_argument("-o", "--output", required=True)
    _remote_args(ex)
    ex.set_defaults(fn=_remote("export_project"))
    im = sub.add_parser("import", help="create a new project from an export (needs a session token)")
    im.add_argument("file")
    im.add_argument("--name")
    _remote_args(im)
    im.set_defaults(fn=_remote("import_project"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fluxbase.devstack.discover import NoDevStack
    from fluxbase.devstack.procs import PortInUse
    from fluxbase.errors import FluxbaseError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ConfigError, PortInUse, NoDevStack) as exc:
        print(f"fluxbase: {exc}", file=sys.stderr)
        return 2
    except FluxbaseError as exc:
        print(f"fluxbase: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
