"""The `motorcade` command: one role per subcommand (api, ingest, worker, migrate, seed, token),
and the dev tools (dev, simulate, openapi). Each subcommand imports what it runs when it runs:
the roles never import devtools/."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from core import tracing


def _settings():  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from core.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"configuration error: {where}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _state_dir(args: argparse.Namespace) -> Path:
    """`--state-dir`, else MOTORCADE_STATE_DIR, else `.motorcade/` in the checkout."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    from devtools.localservers import STATE_DIR

    return STATE_DIR


def _tune_gc() -> None:
    """For the serving roles, once the app is built: move everything alive now (modules,
    the app) out of the collector's sight and collect young objects less often. Requests
    allocate many short-lived objects (parsed telemetry, rows); with the default thresholds
    the cyclic collector ran every 700 allocations and kept rescanning the long-lived heap,
    a third of the ingest path's CPU (docs/telemetry.md). Reference counting still frees
    them at once; only cycles wait for the collector."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_api(args: argparse.Namespace) -> int:
    from api.app import create_app

    settings = _settings()
    tracing.configure_from_env("api")
    _serve(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
    )
    return 0


def _serve(app: Any, *, host: str, port: int, reuse_port: bool = False) -> None:
    """Serve a built app with uvicorn as every serving role does (our logging, no access
    log, 5 s graceful shutdown), after `_tune_gc`. With `reuse_port` the port is bound with
    SO_REUSEPORT, so several processes share it. Exits 3 when the server could not start
    (the port is taken, for example), as `uvicorn.run` does."""
    import socket

    import uvicorn

    _tune_gc()
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    sockets = None
    if reuse_port:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sockets = [sock]
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)


def cmd_ingest(args: argparse.Namespace) -> int:
    """The ingestion role alone: POST /telemetry (group commit) and the devices' desired
    state, on its own port (default API port + 1), in `--processes` processes (default
    MOTORCADE_INGEST_PROCESSES). Several processes each bind the port with SO_REUSEPORT, so
    the kernel spreads connections over them; each has its own queue and writers."""
    settings = _settings()
    processes = args.processes or settings.ingest_processes
    host = args.host or settings.api_host
    port = args.port or settings.api_port + 1
    if processes <= 1:
        _serve_ingest(host, port, reuse_port=False)
        return 0
    import multiprocessing
    import signal

    spawn = multiprocessing.get_context("spawn")
    children = [
        spawn.Process(
            target=_serve_ingest, args=(host, port, True, os.getpid()), name=f"ingest-{n}"
        )
        for n in range(processes)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully.
    stopped = {0, -signal.SIGTERM, -signal.SIGINT}
    return 0 if all(child.exitcode in stopped for child in children) else 1


def _serve_ingest(host: str, port: int, reuse_port: bool, parent: int | None = None) -> None:
    """One ingestion process: its own app, served on `port` (shared when `reuse_port`).
    A child of `motorcade ingest --processes N` stops with its parent, even a killed one."""
    from api.app import create_app

    if parent is not None:
        _stop_with_parent(parent)
    tracing.configure_from_env("ingest")
    _serve(create_app(_settings(), role="ingest"), host=host, port=port, reuse_port=reuse_port)


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux PR_SET_PDEATHSIG), so no child of a
    killed supervisor keeps holding the port."""
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before we asked
        raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    from core.logging import configure_logging
    from worker.main import run_worker

    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    tracing.configure_from_env("worker")
    try:
        asyncio.run(run_worker(settings))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from core import migrate

    settings = _settings()
    if args.downgrade:
        migrate.downgrade(settings.database_url, args.revision or "-1")
        print(f"downgraded to {args.revision or '-1'}")
    else:
        migrate.upgrade(settings.database_url, args.revision or "head")
        print(f"upgraded to {args.revision or 'head'}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from devtools.seed import seed_fleet

    settings = _settings()
    result = seed_fleet(
        settings.libpq_database_url,
        vehicles=args.vehicles,
        state_dir=_state_dir(args),
        only_if_empty=not args.force,
    )
    if result.skipped:
        print("the fleet is already seeded; nothing to do (use --force to add anyway)")
    else:
        print(
            f"seeded {result.vehicles_inserted:,} vehicles and {result.releases_inserted} "
            f"releases in {result.seconds:.1f}s ({result.vehicles_per_second:,.0f} vehicles/s)"
        )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from core.auth import mint_dev_token
    from models.enums import Role

    settings = _settings()
    key = _dev_key(settings, _state_dir(args))
    if key is None:
        return 2
    pairs = _pairs(args.scope, option="--scope", form="NAME=VALUE")
    if pairs is None:
        return 2
    scopes: dict[str, list[str]] = {}
    for name, value in pairs:
        plural = {"region": "regions", "model": "models", "org": "orgs"}.get(name, name)
        scopes.setdefault(plural, []).extend(v for v in value.split(",") if v)
    role = Role(args.role)
    if role is Role.DEVICE and not args.vehicle:
        print("a device token needs --vehicle ID", file=sys.stderr)
        return 2
    try:
        token = mint_dev_token(
            key,
            role=role,
            subject=args.subject,
            audience=settings.oidc_audience,
            vehicle_id=args.vehicle,
            scopes=scopes,
            ttl_seconds=args.ttl,
        )
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(token)
    return 0


def _pairs(items: list[str] | None, *, option: str, form: str) -> list[tuple[str, str]] | None:
    """The `NAME=VALUE` arguments of a repeatable option, split at the first `=`; None, after
    saying so, when one has no `=` or nothing after it."""
    pairs = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value:
            print(f"{option} takes {form}, not {item!r}", file=sys.stderr)
            return None
        pairs.append((name, value))
    return pairs


def _dev_key(settings, state_dir: Path) -> str | None:  # type: ignore[no-untyped-def]
    """The dev key that signs dev tokens, or None after saying there is none."""
    from devtools.devkey import configured_dev_key

    key = configured_dev_key(settings, state_dir)
    if key is None:
        print("no dev key: set MOTORCADE_DEV_KEY or run `make dev` once", file=sys.stderr)
    return key


def _rate(text: str) -> float:
    """A probability, 0 to 1 (the simulator's rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


# `motorcade simulate` options named as the SimConfig fields they set; one left out keeps the
# SimConfig default (the one place the defaults are written).
SIMULATE_OPTIONS = (
    "vehicles",
    "failure_rate",
    "low_battery_rate",
    "moving_rate",
    "network_loss_rate",
    "offline_rate",
    "heartbeat_seconds",
    "poll_seconds",
    "apply_seconds",
    "duration",
    "seed",
)


def cmd_simulate(args: argparse.Namespace) -> int:
    from devtools.simulate import SimConfig, simulate

    settings = _settings()
    key = _dev_key(settings, _state_dir(args))
    if key is None:
        return 2
    pairs = _pairs(args.release_failure_rate, option="--release-failure-rate", form="VERSION=RATE")
    if pairs is None:
        return 2
    try:
        rates = {version: _rate(rate) for version, rate in pairs}
    except argparse.ArgumentTypeError as exc:
        print(f"--release-failure-rate: {exc}", file=sys.stderr)
        return 2
    chosen = {
        name: getattr(args, name) for name in SIMULATE_OPTIONS if getattr(args, name) is not None
    }
    config = SimConfig(
        api=args.api or f"http://{settings.api_host}:{settings.api_port}",
        id_prefix=args.prefix,
        release_failure_rates=rates,
        min_battery_percent=settings.safety_min_battery_percent,
        **chosen,
    )
    import httpx

    try:
        asyncio.run(simulate(config, key, audience=settings.oidc_audience))
    except KeyboardInterrupt:
        pass
    except httpx.HTTPError as exc:
        print(f"cannot list the fleet at {config.api}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from devtools.devstack import run_dev

    return run_dev(vehicles=args.vehicles, state_dir=_state_dir(args))


def cmd_openapi(args: argparse.Namespace) -> int:
    from devtools.openapi import render_asyncapi_yaml, render_openapi_yaml

    text = render_openapi_yaml()
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    if args.asyncapi:
        Path(args.asyncapi).write_text(render_asyncapi_yaml())
        print(f"wrote {args.asyncapi}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motorcade",
        description="Motorcade: safe software rollouts to vehicle fleets. "
        "Configuration: MOTORCADE_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_role_commands(sub)
    _add_one_shot_commands(sub)
    _add_dev_commands(sub)
    return parser


Subcommands = argparse._SubParsersAction  # what `add_subparsers` returns


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir")  # default: see _state_dir


def _add_role_commands(sub: Subcommands) -> None:
    """The roles a deployment runs: api, ingest, worker."""
    p = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "ingest", help="run the telemetry ingestion role alone (default port: API port + 1)"
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--processes", type=int, help="processes sharing the port (MOTORCADE_INGEST_PROCESSES)"
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("worker", help="run the Temporal worker (rollout workflows, activities)")
    p.set_defaults(func=cmd_worker)


def _add_one_shot_commands(sub: Subcommands) -> None:
    """One-shot commands: migrate, seed, token."""
    p = sub.add_parser("migrate", help="apply schema migrations (Alembic)")
    p.add_argument("--downgrade", action="store_true", help="go down instead of up")
    p.add_argument("--revision", help="target revision (default head, or -1 when down)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("seed", help="seed a sample fleet and signed releases")
    p.add_argument("--vehicles", type=int, default=1000)
    p.add_argument("--force", action="store_true", help="seed even if vehicles exist")
    _add_state_dir(p)
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("token", help="mint a dev token signed by the dev key")
    p.add_argument("--role", required=True, choices=["viewer", "operator", "device", "gateway"])
    p.add_argument("--vehicle", help="the vehicle id of a device token")
    p.add_argument("--scope", action="append", help="region=eu-west, model=atlas, org=acme")
    p.add_argument("--subject", help="the token's subject (default dev-<role>)")
    p.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    _add_state_dir(p)
    p.set_defaults(func=cmd_token)


def _add_dev_commands(sub: Subcommands) -> None:
    """The dev tools (devtools/): dev, simulate, openapi."""
    p = sub.add_parser("dev", help="run the whole system locally (what `make dev` runs)")
    p.add_argument("--vehicles", type=int, default=1000)
    _add_state_dir(p)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser(
        "simulate", help="a fleet of simulated vehicles that poll desired state and report"
    )
    p.add_argument("--vehicles", type=int, help="how many (default: every listed vehicle)")
    p.add_argument("--api", help="API base URL (default http://MOTORCADE_API_HOST:PORT)")
    p.add_argument("--prefix", help="only vehicles whose id starts with this")
    # Rates and times left out keep SimConfig's defaults (SIMULATE_OPTIONS).
    p.add_argument("--failure-rate", type=_rate, help="share of applies failing (0 to 1)")
    p.add_argument(
        "--release-failure-rate",
        action="append",
        metavar="VERSION=RATE",
        help="failure rate of the applies of one release, instead of --failure-rate (repeatable)",
    )
    p.add_argument("--low-battery-rate", type=_rate)
    p.add_argument("--moving-rate", type=_rate)
    p.add_argument("--network-loss-rate", type=_rate)
    p.add_argument("--offline-rate", type=_rate, help="chance per heartbeat to go offline")
    p.add_argument("--heartbeat-seconds", type=float)
    p.add_argument("--poll-seconds", type=float)
    p.add_argument("--apply-seconds", type=float)
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--seed", type=int, help="random seed (reproducible fleets)")
    _add_state_dir(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("openapi", help="print or write the OpenAPI spec (YAML)")
    p.add_argument("--write", help="file to write, e.g. docs/openapi.yaml")
    p.add_argument("--asyncapi", help="also write the stream's AsyncAPI document there")
    p.set_defaults(func=cmd_openapi)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
