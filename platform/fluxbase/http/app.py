"""The Litestar application factory: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable

import asyncpg
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide

from fluxbase import __version__, dashboard
from fluxbase.config import Settings
from fluxbase.db.control import create_control_pool
from fluxbase.db.doorbell import ControlBell, wait_any
from fluxbase.http.context import AppContext
from fluxbase.http.controllers import (
    auth,
    clusters,
    data,
    end_users,
    extensions,
    health,
    mail,
    operations,
    projects,
    realtime,
    rls,
    sql,
    storage,
    team,
    webhooks,
)
from fluxbase.http.edge import EXCEPTION_HANDLERS, provide_caller, provide_ctx
from fluxbase.http.openapi import openapi_asset, openapi_config
from fluxbase.ratelimit import SharedRateLimiter
from fluxbase.services.access import Authenticator
from fluxbase.services.clusters import ClusterPools
from fluxbase.services.identity import IdentityResolver
from fluxbase.storage.s3 import ObjectStore
from fluxbase.tenancy.pools import TenantPools

log = logging.getLogger("fluxbase")

ROUTES = [
    health.live,
    health.ready,
    auth.register,
    auth.login,
    auth.logout,
    auth.me,
    auth.admin_status,
    auth.recover,
    auth.reset_password,
    projects.create_project,
    projects.list_projects,
    projects.get_project,
    projects.delete_project,
    projects.create_key,
    projects.list_keys,
    projects.rotate_key,
    projects.revoke_key,
    storage.list_buckets,
    storage.create_bucket,
    storage.update_bucket,
    storage.delete_bucket,
    storage.upload_file,
    storage.list_files,
    storage.file_url,
    storage.delete_files,
    storage.delete_file,
    storage.create_upload_url,
    storage.confirm_upload,
    storage.public_file,
    team.list_team,
    team.invite_member,
    team.answer_invite,
    team.remove_member,
    team.change_member_role,
    team.list_my_invites,
    sql.execute_sql,
    sql.execute_batch,
    data.get_schema,
    data.list_tables,
    data.create_table,
    data.list_records,
    data.create_records,
    data.get_record,
    data.update_record,
    data.delete_record,
    realtime.list_tables,
    realtime.enable,
    realtime.disable,
    realtime.version,
    realtime.create_token,
    realtime.broadcast,
    webhooks.create_webhook,
    webhooks.list_webhooks,
    webhooks.get_webhook,
    webhooks.update_webhook,
    webhooks.delete_webhook,
    webhooks.test_webhook,
    webhooks.list_deliveries,
    webhooks.redeliver,
    webhooks.project_log,
    operations.apply_migration,
    operations.list_migrations,
    operations.vacuum_project,
    operations.update_project,
    operations.get_quotas,
    operations.list_all_projects,
    operations.set_quotas,
    operations.suspend_project,
    operations.resume_project,
    operations.export_project,
    operations.import_project,
    extensions.list_extensions,
    extensions.install_extension,
    extensions.remove_extension,
    end_users.register,
    end_users.login,
    end_users.refresh,
    end_users.logout,
    end_users.me,
    end_users.request_verification,
    end_users.verify_email,
    end_users.recover,
    end_users.reset_password,
    end_users.magic_link,
    end_users.magic_link_login,
    end_users.request_email_change,
    end_users.confirm_email_change,
    mail.list_templates,
    mail.set_template,
    mail.reset_template,
    mail.preview_template,
    mail.mail_log,
    end_users.list_users,
    end_users.disable_user,
    end_users.enable_user,
    end_users.revoke_sessions,
    end_users.delete_user,
    end_users.get_settings,
    end_users.update_settings,
    rls.list_rls,
    rls.create_policy,
    rls.drop_policy,
    rls.set_table_rls,
    rls.get_realtime_settings,
    rls.set_realtime_settings,
    *clusters.ROUTES,
    openapi_asset,
]


async def _forget_on_ring(
    bell: ControlBell,
    auth: Authenticator,
    stop: asyncio.Event,
    tenants: TenantPools | None = None,
    cluster_pools: Callable[[], ClusterPools] | None = None,
) -> None:
    """Forget every cached key whenever the control doorbell rings, the tenant pools of
    projects that moved to another cluster (services.moves) or whose cluster's connection
    changed, and the runtime pools of such clusters (sql/0045 rings on that change)."""
    while not stop.is_set():
        await wait_any(bell.rang, stop)
        bell.rang.clear()
        auth.forget_all()
        if tenants is not None:
            try:
                await tenants.forget_moved()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not check for moved projects: %r", exc)
        if cluster_pools is not None:
            try:
                await cluster_pools().forget_changed()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not check for changed cluster connections: %r", exc)


def create_app(settings: Settings) -> Litestar:
    """Build the API app; connections are opened at startup, closed at shutdown."""

    async def startup(app: Litestar) -> None:
        db = await create_control_pool(settings)
        store = ObjectStore(settings.s3)
        await store.start()
        try:
            await store.ensure_bucket()
        except Exception as exc:  # S3 may come up later; /ready reports it meanwhile
            log.warning("could not ensure the S3 bucket exists: %r", exc)
        app.state.ctx = AppContext(
            settings=settings,
            db=db,
            tenants=TenantPools(settings, control=db),
            store=store,
            auth=Authenticator(db, settings),
            identity=IdentityResolver(db, settings),
            limiter=SharedRateLimiter(db),
        )
        ctx = app.state.ctx
        # A tenant backend past its deadline on a registered cluster is signalled there.
        ctx.tenants.cluster_pool = lambda cluster_id: ctx.cluster_pools().pool(cluster_id)
        # A project's first request needs no cluster lookup: its key's lookup read the row.
        ctx.auth.on_project = lambda project: ctx.tenants.locate(project.id, project.cluster_id)
        # Replicas agree: a key revoked or a project suspended through another API process
        # drops this process's cached keys at once (the SQL path's guard refuses them anyway).
        app.state.bell_stop = asyncio.Event()
        bell = ControlBell(settings.database.url, "fluxbase-api-control")
        app.state.bell_tasks = [
            asyncio.create_task(bell.run(app.state.bell_stop)),
            asyncio.create_task(
                _forget_on_ring(
                    bell, ctx.auth, app.state.bell_stop, ctx.tenants, cluster_pools=ctx.cluster_pools
                )
            ),
        ]

        if settings.run_worker_in_api:
            # One-node setups: the worker (webhook delivery, housekeeping) inside this process.
            from fluxbase.worker import run_worker

            app.state.worker_stop = asyncio.Event()
            app.state.worker = asyncio.create_task(run_worker(settings, app.state.worker_stop))

        # What startup built (modules, the app and its routes, pools) lives as long as the
        # process: out of the cyclic collector's sight. At 32 concurrent requests more request
        # objects are alive at each young collection, get promoted, and set off full collections
        # over all of this (none per 4 000 requests at 8 clients, one at 32; each pauses every
        # request in flight). docs/sql.md, "Tail latency at 32 clients".
        gc.collect()
        gc.freeze()

    async def shutdown(app: Litestar) -> None:
        if hasattr(app.state, "bell_stop"):
            app.state.bell_stop.set()
            for task in app.state.bell_tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)
        worker: asyncio.Task[None] | None = getattr(app.state, "worker", None)
        if worker is not None:
            app.state.worker_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker, 10)
        ctx: AppContext | None = getattr(app.state, "ctx", None)
        if ctx is not None:
            await ctx.close()

    return Litestar(
        route_handlers=[*ROUTES, dashboard.root, dashboard.router()],
        dependencies={"ctx": Provide(provide_ctx), "caller": Provide(provide_caller)},
        exception_handlers=EXCEPTION_HANDLERS,
        # Security headers on every /dashboard answer, the 404s the router itself gives included.
        before_send=[dashboard.security.add_headers],
        on_startup=[startup],
        on_shutdown=[shutdown],
        state=State(),
        cors_config=CORSConfig(allow_origins=["*"], allow_headers=["*"], allow_methods=["*"], max_age=600),
        openapi_config=openapi_config("Fluxbase API", __version__),
        debug=False,
        logging_config=None,
    )
