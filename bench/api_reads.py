"""The dashboard's reads at fleet scale: latency of the real API over HTTP.

    .venv/bin/python bench/api_reads.py [--vehicles 1000000] [--events 10000000]
                                         [--clients 8] [--requests 1000] [--keep]

A fresh, migrated database (on the server at MOTORCADE_DATABASE_URL, else the embedded one
under .motorcade/bench-pgdata with FLEET_SCALE_SETTINGS), seeded with `--vehicles` vehicles
(`devtools.seed`), a synthetic status mix (by a hash of the id: 90% in_sync, 4% pending, 3%
updating, 1.5% blocked with a reason code, 1% failed with one, 0.5% offline), and `--events`
timeline events spread evenly over the vehicles (generated in SQL). The fleet summary's
materialization is refreshed and the tables analyzed; then `motorcade api` (one process)
serves on a loopback port and `--clients` concurrent keep-alive clients (`bench.http11`, a
viewer token) send `--requests` requests per line:

- list vehicles filtered by region: the first page, and page 1,000 (its cursor found by
  walking the pages first), limit 50;
- list vehicles filtered by status (`failed`): first page and the deepest page up to 1,000;
- list vehicles sorted by status (`sort=status`): first page and page 1,000;
- one vehicle (random ids), its timeline (first page), the fleet summary.

Prints p50 and p99 per line and the ratio of each deep page's p99 to its first page's
(measured in the same run: the in-run baseline). Goals (issue 5): p99 under 50 ms for each,
deep page within 1.5x of the first. Nothing is asserted: these machines are noisy.

Before the latencies, the query plans (`EXPLAIN`) of the statements the list endpoints run on
vehicles and timeline events, built by the API's own query builders: every filter, every sort
both ways, a deep cursor, scoped callers, a timeline and the desired states. Each line names
the plan's scans; `SEQ SCAN` marks a sequential scan of vehicles, timeline events or desired
states (none is expected), and the count of them ends the section. `--plans-only` stops there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
import sqlalchemy

from bench.http11 import Http11
from core.auth import generate_dev_key, mint_dev_token
from core.settings import normalize_database_url
from devtools import localservers
from devtools.seed import MODELS, REGIONS, seed_fleet
from models.enums import Role
from models.scope import Scope
from services.desired_states import DesiredStateFilters, desired_state_list_statement
from services.fleet import refresh_fleet_counts_now
from services.pagination import encode_cursor
from services.vehicles import (
    VEHICLE_SORTS,
    VehicleFilters,
    timeline_query,
    vehicle_list_query,
)

# (status, reason code, cumulative share by hash bucket out of 1,000)
STATUS_MIX = (
    ("in_sync", None, 900),
    ("pending", None, 940),
    ("updating", None, 970),
    ("blocked", "BATTERY_LOW", 985),
    ("failed", "APPLY_FAILED", 995),
    ("offline", None, 1000),
)
DEEP_PAGE = 1000
LIMIT = 50
# The lists measured at their first page and their page DEEP_PAGE (name: query).
LISTS = {
    "?region=": f"region={REGIONS[0]}",
    "?status=": "status=failed",
    "?sort=status": "sort=status",
}


def set_statuses(conn: psycopg.Connection) -> None:
    statuses: list[str] = []
    codes: list[str] = []
    lower = 0
    for status, code, upto in STATUS_MIX:
        statuses.append(f"WHEN b < {upto} THEN '{status}'")
        if code:
            codes.append(f"WHEN b >= {lower} AND b < {upto} THEN ARRAY['{code}']")
        lower = upto
    conn.execute(
        f"""
        UPDATE vehicles v SET status = CASE {" ".join(statuses)} END,
               reason_codes = CASE {" ".join(codes)} ELSE '{{}}'::text[] END
        FROM (SELECT id, ('x' || substr(md5(id), 1, 8))::bit(32)::bigint % 1000 AS b
              FROM vehicles) h
        WHERE h.id = v.id
        """
    )


def seed_events(conn: psycopg.Connection, vehicles: int, events: int) -> None:
    per = max(1, events // max(1, vehicles))
    conn.execute(
        """
        INSERT INTO timeline_events (vehicle_id, event_id, seq, type, occurred_at,
            desired_state_id, release_version, reason_code, details)
        SELECT v.id, gen_random_uuid(), s.n,
               (ARRAY['desired_notified', 'apply_start', 'ready'])[1 + (s.n - 1) %% 3],
               now() - make_interval(mins => (%(per)s - s.n) * 10),
               v.desired_state_id, v.desired_release_version, NULL, '{}'::jsonb
        FROM vehicles v CROSS JOIN generate_series(1, %(per)s) AS s(n)
        ORDER BY v.id, s.n
        """,
        {"per": per},
    )
    conn.execute(
        "UPDATE vehicles SET last_event_seq = %(per)s, last_event_type = 'ready'", {"per": per}
    )


async def timed(base: str, token: str, paths: list[str], clients: int) -> list[float]:
    """GET every path with `clients` concurrent keep-alive clients; latencies in ms."""
    queue = list(reversed(paths))
    latencies: list[float] = []

    async def worker() -> None:
        client = Http11(base, token)
        try:
            while queue:
                path = queue.pop()
                started = time.perf_counter()
                status, _, data = await client.get(path)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status} {data[:300]!r}")
        finally:
            await client.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


async def deep_cursor(base: str, token: str, path: str, pages: int) -> tuple[str | None, int]:
    """Walk `pages` pages of a list; the cursor of the last page reached and its number."""
    client = Http11(base, token)
    cursor: str | None = None
    reached = 1
    try:
        while reached < pages:
            sep = "&" if "?" in path else "?"
            status, _, data = await client.get(path + (f"{sep}cursor={cursor}" if cursor else ""))
            if status != 200:
                raise RuntimeError(f"GET {path}: {status} {data[:300]!r}")
            following = json.loads(data)["metadata"]["nextCursor"]
            if not following:
                break
            cursor = following
            reached += 1
    finally:
        await client.close()
    return cursor, reached


BIG_TABLES = ("vehicles", "timeline_events", "desired_states")


def plan_scans(node: dict[str, Any]) -> list[str]:
    """The scans of a plan tree (EXPLAIN's JSON), depth first."""
    scans: list[str] = []
    kind = node.get("Node Type", "")
    if "Scan" in kind:
        relation = node.get("Relation Name", "")
        index = node.get("Index Name")
        label = f"{kind} {index}" if index else f"{kind} {relation}"
        if kind == "Seq Scan" and relation.startswith(BIG_TABLES):
            label = f"SEQ SCAN {relation}"
        scans.append(label)
    if kind == "Sort":
        scans.append(f"Sort ({node.get('Plan Rows', 0):,} rows est.)")
    for child in node.get("Plans", []):
        scans += plan_scans(child)
    return scans


def plan_cases(conn: psycopg.Connection) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, statement, parameters) for each shape of the list endpoints' queries."""
    row = conn.execute(
        "SELECT id, last_seen_key, status FROM vehicles ORDER BY id OFFSET 500000 LIMIT 1"
    ).fetchone()
    assert row is not None, "the bench database has no vehicles"
    mid_id, mid_seen, mid_status = row
    cases: list[tuple[str, Any, dict[str, Any]]] = []
    everyone = Scope()
    one_region = Scope(regions=(REGIONS[0],))
    filters = {
        "no filter": VehicleFilters(),
        "model": VehicleFilters(models=[MODELS[0]]),
        "region": VehicleFilters(regions=[REGIONS[0]]),
        "region (two)": VehicleFilters(regions=list(REGIONS[:2])),
        "ring": VehicleFilters(rings=["canary"]),
        "status": VehicleFilters(statuses=["failed"]),
        "status (two)": VehicleFilters(statuses=["failed", "blocked"]),
        "reasonCode": VehicleFilters(reason_codes=["APPLY_FAILED"]),
        "releaseVersion": VehicleFilters(release_versions=["2026.09.0"]),
        "rolloutId": VehicleFilters(rollout_ids=["1"]),
        "q (id prefix)": VehicleFilters(q="VIN-00123"),
    }
    for name, f in filters.items():
        for scope_name, scope in (("", everyone), (", scoped to a region", one_region)):
            statement, params, _ = vehicle_list_query(
                scope=scope, filters=f, sort=None, cursor=None, limit=LIMIT
            )
            cases.append((f"vehicles ?{name}{scope_name}", statement, params))
            if name.startswith("status") or name == "region":
                statement, params, _ = vehicle_list_query(
                    scope=scope, filters=f, sort="status", cursor=None, limit=LIMIT
                )
                cases.append((f"vehicles ?{name}&sort=status{scope_name}", statement, params))
    values = {"id": mid_id, "lastSeenAt": mid_seen, "status": mid_status}
    for key in VEHICLE_SORTS:
        for sign in ("", "-"):
            sort = f"{sign}{key.name}"
            statement, params, order = vehicle_list_query(
                scope=everyone, filters=VehicleFilters(), sort=sort, cursor=None, limit=LIMIT
            )
            cases.append((f"vehicles ?sort={sort}", statement, params))
            cursor = encode_cursor(order, values[key.name], mid_id)
            statement, params, _ = vehicle_list_query(
                scope=everyone, filters=VehicleFilters(), sort=sort, cursor=cursor, limit=LIMIT
            )
            cases.append((f"vehicles ?sort={sort}, deep cursor", statement, params))
    statement, params = timeline_query(scope=one_region, vehicle_id=mid_id, cursor=None, limit=50)
    cases.append(("timeline, scoped to a region", statement, params))
    for name, scope, ds_filters in (
        ("desired states", everyone, DesiredStateFilters([], [], [])),
        ("desired states, scoped to a region", one_region, DesiredStateFilters([], [], [])),
        ("desired states ?vehicleId", everyone, DesiredStateFilters([mid_id], [], [])),
    ):
        statement = desired_state_list_statement(
            scope=scope, filters=ds_filters, cursor=None, limit=LIMIT
        )
        cases.append((name, statement, {}))
    return cases


def show_plans(url: str) -> int:
    """Print the plan of each list query shape; the number of sequential scans of the big
    tables."""
    print("\nquery plans of the list endpoints (EXPLAIN, the API's own statements):")
    seq_scans = 0
    engine = sqlalchemy.create_engine(normalize_database_url(url), hide_parameters=True)

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute", retval=True)
    def explain(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _m: Any) -> Any:
        return f"EXPLAIN (FORMAT JSON) {statement}", params  # an ORM statement's plan

    with psycopg.connect(url, autocommit=True) as conn, engine.connect() as orm:
        for name, statement, params in plan_cases(conn):
            if isinstance(statement, str):
                row = conn.execute(f"EXPLAIN (FORMAT JSON) {statement}", params).fetchone()
            else:  # built by SQLAlchemy: its own binding, EXPLAIN put in front
                row = orm.execute(statement).fetchone()
            assert row is not None
            plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
            scans = plan_scans(plan[0]["Plan"])
            seq_scans += sum(s.startswith("SEQ SCAN") for s in scans)
            print(f"  {name:<44} {' > '.join(scans)}")
    engine.dispose()
    print(f"  sequential scans of {', '.join(BIG_TABLES)}: {seq_scans}")
    return seq_scans


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, args: argparse.Namespace) -> list[tuple[str, list[float]]]:
    dev_key = generate_dev_key()
    token = mint_dev_token(dev_key, role=Role.VIEWER)
    port = localservers.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = localservers.start_role_process("api", url, dev_key, port, quiet=True)
    rng = random.Random(7)
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM vehicles ORDER BY random() LIMIT 5000")]
    lines: list[tuple[str, list[float]]] = []
    try:
        # No Temporal here (reads need none): wait for /healthz, not /readyz.
        await localservers.wait_http_ready(base, within=60, path="/healthz")
        n = args.requests

        async def line(name: str, paths: list[str]) -> None:
            lines.append((name, await timed(base, token, paths, args.clients)))

        for name, query in LISTS.items():
            path = f"/api/v1/vehicles?{query}&limit={LIMIT}"
            cursor, reached = await deep_cursor(base, token, path, DEEP_PAGE)
            await line(f"vehicles {name} first page", [path] * n)
            deep = f"{path}&cursor={cursor}" if cursor else path
            await line(f"vehicles {name} page {reached:,}", [deep] * n)
        await line("one vehicle", [f"/api/v1/vehicles/{rng.choice(ids)}" for _ in range(n)])
        await line(
            "its timeline, first page",
            [f"/api/v1/vehicles/{rng.choice(ids)}/timeline?limit={LIMIT}" for _ in range(n)],
        )
        await line("fleet summary", ["/api/v1/fleet/summary"] * n)
    finally:
        localservers.stop_process(proc)
    return lines


def report(lines: list[tuple[str, list[float]]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.requests:,} requests per line, {args.clients} concurrent clients"
        " (p50 / p99 in ms; goal p99 < 50 ms, deep page within 1.5x of the first):"
    )
    p99 = {}
    for name, values in lines:
        p99[name] = pct(values, 0.99)
        ok = "met" if p99[name] < 50 else "NOT met"
        print(f"  {name:<34} p50 {statistics.median(values):7.1f}   p99 {p99[name]:7.1f}   {ok}")
    for name in LISTS:
        first = p99[f"vehicles {name} first page"]
        deep = next(v for k, v in p99.items() if k.startswith(f"vehicles {name} page"))
        ratio = deep / first if first else float("inf")
        print(
            f"  {name} deep page / first page (p99): {ratio:.2f}"
            f"  {'met' if ratio <= 1.5 else 'NOT met'}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vehicles", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="requests per line")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument(
        "--plans-only", action="store_true", help="print the query plans, measure nothing"
    )
    parser.add_argument(
        "--reuse",
        metavar="DATABASE",
        help="measure a database kept by an earlier run (--keep) instead of seeding one: for"
        " comparing two builds on the same data",
    )
    args = parser.parse_args(argv)
    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    if args.reuse:
        url = localservers.with_database(server, args.reuse)
        print(f"== api reads bench: database {args.reuse} (reused)", flush=True)
        show_plans(url)
        if not args.plans_only:
            report(asyncio.run(measure(url, args)), args)
        return
    with localservers.bench_database(server, keep=args.keep) as (name, url):
        print(f"== api reads bench: database {name}, {args.vehicles:,} vehicles", flush=True)
        started = time.perf_counter()
        seed_fleet(
            url,
            vehicles=args.vehicles,
            state_dir=localservers.STATE_DIR / "bench-api-reads",
            only_if_empty=False,
        )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            set_statuses(conn)
            seed_events(conn, args.vehicles, args.events)
            conn.execute("VACUUM ANALYZE vehicles")
            conn.execute("VACUUM ANALYZE vehicles_by_status")
            conn.execute("ANALYZE timeline_events")
            with conn.transaction():
                refresh_fleet_counts_now(conn)
            events = conn.execute("SELECT count(*) FROM timeline_events").fetchone()
        print(
            f"  seeded {args.vehicles:,} vehicles and {events[0] if events else 0:,} events"
            f" in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        show_plans(url)
        if not args.plans_only:
            report(asyncio.run(measure(url, args)), args)


if __name__ == "__main__":
    main()
