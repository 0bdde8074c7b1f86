"""`make dev`: the whole system on one machine, from nothing.

PostgreSQL (MOTORCADE_DATABASE_URL, else an embedded server in .motorcade/pgdata), Temporal
(MOTORCADE_TEMPORAL_ADDRESS, else `temporal server start-dev` with its Web UI on :8233 and a
persistent database file), migrations, a seeded fleet (once), then the worker, the API and a
simulated fleet (`motorcade simulate`, unless MOTORCADE_DEV_SIMULATE=0; options from
MOTORCADE_DEV_SIMULATE_ARGS, split as a shell would) as child processes.
Ctrl-C stops everything this command started; a second run reuses the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.auth import mint_dev_token
from core.migrate import upgrade
from devtools import localservers
from devtools.devkey import load_or_create_dev_key
from devtools.seed import seed_fleet
from models.enums import Role

# Ports of what `make dev` starts; the variables exist so that a test can run a second stack.
TEMPORAL_PORT = int(os.environ.get("MOTORCADE_DEV_TEMPORAL_PORT", "7233"))
TEMPORAL_UI_PORT = int(os.environ.get("MOTORCADE_DEV_TEMPORAL_UI_PORT", "8233"))
API_HOST = "127.0.0.1"
API_PORT = int(os.environ.get("MOTORCADE_API_PORT", "8000"))


def say(message: str) -> None:
    print(f"[motorcade dev] {message}", flush=True)


class Stack:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: dict[str, Path] = {}
        self.embedded_pg: Path | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path | None = None):  # type: ignore[no-untyped-def]
        out = open(log, "ab") if log else None
        if log:
            self.logs[name] = log
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out or None,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
        self.children.append((name, proc))
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                say(f"stopping {name}")
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
        if self.embedded_pg is not None:
            say("stopping embedded PostgreSQL")
            localservers.stop_embedded_postgres(self.embedded_pg)


def _database_url(stack: Stack) -> str:
    url = os.environ.get("MOTORCADE_DATABASE_URL")
    if url:
        say("PostgreSQL: MOTORCADE_DATABASE_URL")
        return url
    data = stack.state_dir / "pgdata"
    say(f"PostgreSQL: starting the embedded server in {data}")
    server_url = localservers.embedded_postgres_url(data)
    stack.embedded_pg = data
    return localservers.ensure_database(server_url, "motorcade")


def _temporal_address(stack: Stack, env: dict[str, str]) -> str:
    address = os.environ.get("MOTORCADE_TEMPORAL_ADDRESS")
    if address:
        say(f"Temporal: {address} (MOTORCADE_TEMPORAL_ADDRESS)")
        return address
    from core.temporal import dev_server_search_attribute_flags

    for port in (TEMPORAL_PORT, TEMPORAL_UI_PORT):
        if localservers.port_open("127.0.0.1", port):
            raise SystemExit(
                f"port {port} is taken: stop what uses it, or point MOTORCADE_TEMPORAL_ADDRESS "
                "at a running Temporal server"
            )
    say(f"Temporal: starting the dev server (Web UI on :{TEMPORAL_UI_PORT})")
    stack.spawn(
        "temporal",
        [
            localservers.venv_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(TEMPORAL_PORT),
            "--ui-port",
            str(TEMPORAL_UI_PORT),
            "--db-filename",
            str(stack.state_dir / "temporal.db"),
            "--log-level",
            "error",
            *dev_server_search_attribute_flags(),
        ],
        env,
        log=stack.state_dir / "temporal.log",
    )
    localservers.wait_for_port("127.0.0.1", TEMPORAL_PORT, timeout=60)
    localservers.wait_for_port("127.0.0.1", TEMPORAL_UI_PORT, timeout=60)
    return f"127.0.0.1:{TEMPORAL_PORT}"


def _wait_ready(base: str, procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("the API did not become ready within 90 s")


def _stopping_already(signum: int, _frame: object) -> None:
    say("stopping already: every process this command started is being stopped")


def _stop_on_further_signals() -> None:
    """From now on Ctrl-C and SIGTERM only say so: a second one (an impatient user, a
    supervisor signalling the process group and the process) must not abandon the stop
    half-way, as the children run in their own sessions and would be left running."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopping_already)


def run_dev(*, vehicles: int, state_dir: Path) -> int:
    """Start everything, print where it is, run until Ctrl-C (or SIGTERM, or a child that
    exits), then stop everything it started, in reverse order."""
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(state_dir)
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        _stop_on_further_signals()  # before raising: a signal right behind this one is safe
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        dev_key = load_or_create_dev_key(state_dir)
        env = _start_servers(stack, dev_key)
        _prepare_database(env["MOTORCADE_DATABASE_URL"], vehicles=vehicles, state_dir=state_dir)
        base = _start_roles(stack, env)
        print(_banner(base, env, dev_key), flush=True)
        return _supervise(stack)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        _stop_on_further_signals()
        if interrupted:
            say("interrupted")
        stack.stop()


def dev_metrics_token(dev_key: str) -> str:
    """The dev stack's metrics secret (MOTORCADE_METRICS_TOKEN), unless one is set: derived
    from the dev key, so it stays the same from one `make dev` to the next."""
    return (
        os.environ.get("MOTORCADE_METRICS_TOKEN")
        or hashlib.sha256(f"motorcade-dev-metrics:{dev_key}".encode()).hexdigest()
    )


def _start_servers(stack: Stack, dev_key: str) -> dict[str, str]:
    """PostgreSQL and Temporal (started unless configured); returns the environment the
    children run with."""
    env = {
        **os.environ,
        "MOTORCADE_ENV": "dev",
        "MOTORCADE_DATABASE_URL": _database_url(stack),
        "MOTORCADE_DEV_KEY": dev_key,
        "MOTORCADE_METRICS_TOKEN": dev_metrics_token(dev_key),
        "MOTORCADE_LOG_FORMAT": os.environ.get("MOTORCADE_LOG_FORMAT", "console"),
        "MOTORCADE_TRUSTED_KEYS_FILE": str(stack.state_dir / "trusted-keys.json"),
    }
    env["MOTORCADE_TEMPORAL_ADDRESS"] = _temporal_address(stack, env)
    if "MOTORCADE_TEMPORAL_ADDRESS" not in os.environ:
        env["MOTORCADE_TEMPORAL_UI_URL"] = f"http://127.0.0.1:{TEMPORAL_UI_PORT}"
    return env


def _prepare_database(database_url: str, *, vehicles: int, state_dir: Path) -> None:
    """Migrate, then seed the sample fleet unless it is there already."""
    say("migrating the schema")
    upgrade(database_url)
    result = seed_fleet(database_url, vehicles=vehicles, state_dir=state_dir)
    if result.skipped:
        say("fleet already seeded: reusing it")
    else:
        say(f"seeded {result.vehicles_inserted:,} vehicles in {result.seconds:.1f}s")


def _start_roles(stack: Stack, env: dict[str, str]) -> str:
    """The worker and the API, then (once the API is ready) the simulated fleet; returns the
    API's base URL."""
    motorcade = localservers.venv_binary("motorcade")
    worker = stack.spawn("worker", [motorcade, "worker"], env)
    api = stack.spawn("api", [motorcade, "api", "--host", API_HOST, "--port", str(API_PORT)], env)
    base = f"http://{API_HOST}:{API_PORT}"
    _wait_ready(base, [("worker", worker), ("api", api)])
    if os.environ.get("MOTORCADE_DEV_SIMULATE", "1") != "0":
        options = simulate_options()
        log = stack.state_dir / "simulate.log"
        shown = shlex.join(["motorcade", "simulate", *options])
        say(f"simulated fleet: `{shown}` (log: {log})")
        stack.spawn(
            "simulate",
            [motorcade, "simulate", "--api", base, "--state-dir", str(stack.state_dir), *options],
            env,
            log=log,
        )
    return base


def simulate_options() -> list[str]:
    """MOTORCADE_DEV_SIMULATE_ARGS split as a shell would: the options `make dev` gives its
    simulated fleet (`motorcade simulate --help`), e.g. `--release-failure-rate 2026.11.0=0.5`."""
    try:
        return shlex.split(os.environ.get("MOTORCADE_DEV_SIMULATE_ARGS", ""))
    except ValueError as exc:
        raise SystemExit(f"MOTORCADE_DEV_SIMULATE_ARGS: {exc}") from None


def _banner(base: str, env: dict[str, str], dev_key: str) -> str:
    """What the user reads once everything runs: where it is, and a token per role."""
    viewer = mint_dev_token(dev_key, role=Role.VIEWER, subject="dev-viewer")
    operator = mint_dev_token(dev_key, role=Role.OPERATOR, subject="dev-operator")
    ui = (
        env.get("MOTORCADE_TEMPORAL_UI_URL")
        if "MOTORCADE_TEMPORAL_ADDRESS" not in os.environ
        else None
    )
    return "\n".join(
        [
            "",
            "Motorcade is running.",
            f"  Dashboard    {base}/#token={operator}",
            "               (signed in as dev-operator; the token stays in the URL fragment,",
            "               which no server sees; sign out, then paste $VIEWER_TOKEN to look",
            "               as a viewer)",
            f"  API          {base}/api/v1   (ready: {base}/readyz)",
            f"  API docs     {base}/docs   (Swagger UI, no token needed; {base}/openapi.json)",
            f"  Temporal UI  {ui or 'your Temporal server'}",
            f"  Temporal     {env['MOTORCADE_TEMPORAL_ADDRESS']}",
            "",
            "Dev tokens (12 h; more with `.venv/bin/motorcade token --role ...`):",
            f"  export VIEWER_TOKEN={viewer}",
            f"  export OPERATOR_TOKEN={operator}",
            "Metrics secret (MOTORCADE_METRICS_TOKEN; /metrics takes no user token):",
            f"  export METRICS_TOKEN={env['MOTORCADE_METRICS_TOKEN']}",
            "",
            "Try:",
            f'  curl -H "Authorization: Bearer $VIEWER_TOKEN" {base}/api/v1/vehicles?limit=3',
            f'  curl -H "Authorization: Bearer $METRICS_TOKEN" {base}/metrics',
            "",
            "Ctrl-C stops everything this command started.",
            "",
        ]
    )


def _supervise(stack: Stack) -> int:
    """Wait; a child that exits stops the whole stack (exit code 1)."""
    while True:
        for name, proc in stack.children:
            if proc.poll() is not None:
                log = stack.logs.get(name)
                said = f" (its output: {log})" if log else ""
                say(f"{name} exited with code {proc.returncode}{said}; stopping")
                return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(run_dev(vehicles=1000, state_dir=localservers.STATE_DIR))
