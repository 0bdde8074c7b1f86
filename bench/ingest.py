"""Telemetry ingestion on this machine: the public endpoint against a COPY ceiling, and a
million vehicles' heartbeats.

    .venv/bin/python bench/ingest.py [--vehicles 1000000] [--events 300000] [--clients 16]

A fresh, migrated database (on the server at MOTORCADE_DATABASE_URL, else an embedded one
under .motorcade/bench-pgdata), seeded with `--vehicles` vehicles (binary COPY); dropped at
the end unless `--keep`. The endpoint is the real `motorcade ingest` (uvicorn, group commit;
`--processes`, default one per core) on a loopback port; the clients are asyncio tasks in this
process (a minimal HTTP/1.1 keep-alive client, `Http11`), sending pre-serialized bodies with a
gateway token. Before the events, the first `--events / 3`
vehicles get a new desired state (as a rollout would), so their events move real statuses:
each sends `desired_notified`, `apply_start`, `ready` (seq 1, 2, 3) on that desired state.

Prints events per second (medians of `--repeat` runs, with their spread) for:

1. ceiling: binary COPY of the same events (new ids) straight into `timeline_events`, one
   stream, measured just before each run of the endpoint and kept, so both write into a table
   of the same size;
2. the endpoint, batches of 500 events from `--clients` concurrent clients (dedupe, ordering,
   status derivation, wide-row writes, change feed: everything), in two layouts: each
   vehicle's three events in three different batches (what a gateway sends during a rollout,
   where a vehicle's events are minutes apart: each event moves its vehicle's status, a
   rewrite of the wide `vehicles` row), and each vehicle's three events in one batch (a
   buffering gateway: one wide-row write per vehicle);
3. the endpoint, single-event requests (a smaller sample) from 64 concurrent clients;

with each one's ratio to the ceiling (goal: at least 30,000 events/s through the endpoint and
at least 1/4 of the ceiling). Then heartbeats for every vehicle, batches of 500:

4. first contact (each vehicle's narrow `vehicle_telemetry` row is created);
5. steady state, nothing visible changed (a HOT update of the narrow row only);
6. every heartbeat rewrites the wide `vehicles` row (what happens every
   `MOTORCADE_TELEMETRY_REFRESH_SECONDS`, and what a design without the narrow table does on
   every heartbeat);

and the sustained rate at one heartbeat a minute per vehicle with the default refresh of 240 s
(3 narrow-only heartbeats for 1 wide), against the goal: vehicles / 60 per second.
No figure here is asserted: these machines are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.cpu import CpuMeter, postmaster_pid
from bench.http11 import Http11
from core.auth import generate_dev_key, mint_dev_token
from devtools import localservers
from devtools.seed import SAMPLE_RELEASES, seed_fleet
from models.enums import Role

BATCH = 500
GOAL_EVENTS_PER_SECOND = 30_000
KINDS = ("desired_notified", "apply_start", "ready")


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


# --- Fixtures ------------------------------------------------------------------------------


def new_desired_states(url: str, count: int, release: str, skip: int = 0) -> list[tuple[str, str]]:
    """Give `count` vehicles a new desired state (set-based, as a rollout would). They are
    picked as a rollout picks a stage, by an md5 rank (after the first `skip` of that order),
    so they are spread over the whole fleet, not a run of neighbouring ids."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            WITH v AS (SELECT id FROM vehicles ORDER BY md5('bench:' || id), id
                       OFFSET %(skip)s LIMIT %(n)s),
            ds AS (
                INSERT INTO desired_states (id, vehicle_id, release_version, created_by)
                SELECT gen_random_uuid(), v.id, %(rel)s, 'bench' FROM v
                RETURNING id, vehicle_id
            ),
            up AS (
                UPDATE vehicles SET desired_release_version = %(rel)s, desired_state_id = ds.id,
                       status = 'pending'
                FROM ds WHERE vehicles.id = ds.vehicle_id
                RETURNING vehicles.id, ds.id AS ds
            )
            SELECT id, ds::text FROM up ORDER BY id
            """,
            {"skip": skip, "n": count, "rel": release},
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def make_events(
    targets: list[tuple[str, str]], release: str, first_seq: int = 1
) -> list[dict[str, Any]]:
    """Each target's `desired_notified`, `apply_start`, `ready` (seq `first_seq` and the next
    two): all the first events, then all the second, then the third, each round in its own
    random order (a fleet's events arrive in no particular order of vehicle id)."""
    now = datetime.now(UTC)
    events = []
    shuffle = random.Random(len(targets) + first_seq)
    for seq, kind in enumerate(KINDS, start=first_seq):
        order = list(targets)
        shuffle.shuffle(order)
        for vid, ds in order:
            events.append(
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vid,
                    "seq": seq,
                    "type": kind,
                    "occurredAt": iso(now + timedelta(milliseconds=seq)),
                    "desiredStateId": ds,
                    "releaseVersion": release,
                    "details": {"stage": kind},
                }
            )
    return events


def copy_ceiling(url: str, events: list[dict[str, Any]]) -> float:
    """Binary COPY of the same events (new event ids) into timeline_events, committed and
    kept, so the ceiling and the endpoint write into a table of the same size; returns
    seconds."""
    rows = [
        (
            e["vehicleId"],
            uuid.UUID(e["eventId"]),
            e["seq"],
            e["type"],
            datetime.fromisoformat(e["occurredAt"].replace("Z", "+00:00")),
            uuid.UUID(e["desiredStateId"]),
            e["releaseVersion"],
            e["details"],
        )
        for e in events
    ]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy(
                "COPY timeline_events (vehicle_id, event_id, seq, type, occurred_at,"
                " desired_state_id, release_version, details) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(
                    ["text", "uuid", "int8", "text", "timestamptz", "uuid", "text", "jsonb"]
                )
                for row in rows:
                    copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - started
    return seconds


# --- The endpoint --------------------------------------------------------------------------


async def send_all(
    base: str, token: str, bodies: list[bytes], clients: int
) -> tuple[float, int, int]:
    """POST every body with `clients` concurrent clients (one keep-alive connection each);
    retries 503 after Retry-After. Returns seconds, accepted, 503s."""
    queue = list(reversed(bodies))
    accepted = 0
    overloaded = 0

    async def worker() -> None:
        nonlocal accepted, overloaded
        client = Http11(base, token)
        try:
            while queue:
                body = queue.pop()
                while True:
                    status, headers, data = await client.post("/api/v1/telemetry", body)
                    if status == 503:
                        overloaded += 1
                        await asyncio.sleep(float(headers.get("retry-after", "1")))
                        continue
                    if status != 202:
                        raise RuntimeError(f"{status}: {data[:300]!r}")
                    accepted += json.loads(data)["data"]["accepted"]
                    break
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, accepted, overloaded


def event_bodies(events: list[dict[str, Any]], size: int) -> list[bytes]:
    return [
        json.dumps({"events": events[i : i + size]}).encode() for i in range(0, len(events), size)
    ]


def heartbeat_bodies(
    fleet: list[tuple[str, int | None, bool | None, str | None]], sent_at: datetime
) -> list[bytes]:
    stamp = iso(sent_at)
    bodies = []
    for i in range(0, len(fleet), BATCH):
        beats = [
            {
                "vehicleId": vid,
                "sentAt": stamp,
                "batteryPercent": battery,
                "stationary": stationary,
                "actualReleaseVersion": actual,
            }
            for vid, battery, stationary, actual in fleet[i : i + BATCH]
        ]
        bodies.append(json.dumps({"heartbeats": beats}).encode())
    return bodies


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Each endpoint layout is run `--repeat` times (the same vehicles given a new desired state
    each time, their seqs continuing) and so is the ceiling; the report takes medians."""
    figures: dict[str, float] = {}
    release = SAMPLE_RELEASES[-1].version
    per_layout = args.events // len(KINDS)
    ceilings: list[float] = []
    figures["events"] = per_layout * len(KINDS)

    dev_key = generate_dev_key()
    token = mint_dev_token(dev_key, role=Role.GATEWAY)
    port = localservers.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = localservers.start_ingest_process(
        url,
        dev_key,
        port,
        processes=args.processes,
        log_level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    )
    meter = CpuMeter({"ingest": proc.pid, "postgres": postmaster_pid(url)})
    cpu: dict[str, list[dict[str, float]]] = {"batch": [], "grouped": []}

    async def metered(name: str, bodies: list[bytes], clients: int) -> tuple[float, int, int]:
        """`send_all`, and the CPU each part spent per accepted event (microseconds)."""
        meter.start()
        seconds, accepted, busy = await send_all(base, token, bodies, clients)
        spent = meter.stop()
        cpu.setdefault(name, []).append(
            {part: s * 1e6 / max(accepted, 1) for part, s in spent.items()}
        )
        return seconds, accepted, busy

    try:
        await localservers.wait_http_ready(base)
        rates: dict[str, list[float]] = {"batch": [], "grouped": []}
        for repeat in range(args.repeat):
            first = 1 + len(KINDS) * repeat
            # Batches of 500, each vehicle's events in different batches (all first events,
            # then the second, then the third): each event moves its vehicle's status.
            targets = new_desired_states(url, per_layout, release)
            events = make_events(targets, release, first)
            ceilings.append(len(events) / copy_ceiling(url, make_events(targets, release, first)))
            seconds, accepted, busy = await metered(
                "batch", event_bodies(events, BATCH), args.clients
            )
            rates["batch"].append(accepted / seconds)
            figures["batch_503"] = figures.get("batch_503", 0) + busy
            # The same volume with each vehicle's three events inside one batch (a gateway
            # that buffers): one wide-row write per vehicle.
            grouped_targets = new_desired_states(url, per_layout, release, skip=per_layout)
            grouped = make_events(grouped_targets, release, first)
            random.Random(repeat).shuffle(grouped_targets)
            place = {vid: n for n, (vid, _) in enumerate(grouped_targets)}
            grouped.sort(key=lambda e: (place[e["vehicleId"]], e["seq"]))
            seconds, accepted, busy = await metered(
                "grouped", event_bodies(grouped, BATCH), args.clients
            )
            rates["grouped"].append(accepted / seconds)
            figures["grouped_503"] = figures.get("grouped_503", 0) + busy
            print(
                f"  repeat {repeat + 1}: ceiling {ceilings[repeat]:,.0f}, batches"
                f" {rates['batch'][-1]:,.0f}, grouped {rates['grouped'][-1]:,.0f} events/s;"
                f" CPU per event: batches {cpu_line(cpu['batch'][-1])},"
                f" grouped {cpu_line(cpu['grouped'][-1])}",
                flush=True,
            )
        for name, values in rates.items():
            figures[name] = statistics.median(values)
            figures[f"{name}_min"] = min(values)
            figures[f"{name}_max"] = max(values)
        figures["ceiling"] = statistics.median(ceilings)
        figures["ceiling_min"], figures["ceiling_max"] = min(ceilings), max(ceilings)
        # Single-event requests: a sample on other vehicles' fresh events.
        sample_targets = new_desired_states(url, args.single // 3, release, skip=2 * per_layout)
        singles = make_events(sample_targets, release)
        seconds, accepted, busy = await metered("single", event_bodies(singles, 1), 64)
        figures.update(
            single_events=len(singles),
            single_seconds=seconds,
            single_accepted=accepted,
            single_503=busy,
        )
        for name, spent in cpu.items():
            for part in spent[0] if spent else {}:
                figures[f"{name}_cpu_{part}"] = statistics.median(s[part] for s in spent)
        # Heartbeats for every vehicle.
        with psycopg.connect(url) as conn:
            fleet = conn.execute(
                "SELECT id, battery_percent, stationary, actual_release_version FROM vehicles"
                " ORDER BY id"
            ).fetchall()
        figures["fleet"] = len(fleet)
        # lastSeenAt is the server's receive time (docs/telemetry.md, "Clocks and
        # counters"): a round cannot be dated later by its `sentAt`, so before the wide
        # round the wide rows' lastSeenAt is moved 700 s back (then vacuumed), past the
        # refresh interval, as if the vehicles had last been written that long ago.
        for name in ("hb_first", "hb_narrow", "hb_wide"):
            if name == "hb_wide":
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE vehicles SET last_seen_at = last_seen_at - interval '700 s'"
                    )
                    conn.execute("VACUUM vehicles")
            bodies = heartbeat_bodies(fleet, datetime.now(UTC))  # type: ignore[arg-type]
            seconds, _, busy = await send_all(base, token, bodies, args.clients)
            figures[f"{name}_seconds"] = seconds
            figures[f"{name}_503"] = busy
            print(f"  {name}: {len(fleet) / seconds:,.0f} heartbeats/s", flush=True)
    finally:
        localservers.stop_process(proc)
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT count(*) FROM timeline_events").fetchone()
    figures["stored_events"] = float(stored[0]) if stored else 0.0
    return figures


def cpu_line(spent: dict[str, float]) -> str:
    """`ingest 12 + postgres 30 + client 3 = 45 us`: CPU microseconds per event."""
    parts = " + ".join(f"{part} {us:,.0f}" for part, us in spent.items())
    return f"{parts} = {sum(spent.values()):,.0f} us"


def report_cpu(f: dict[str, float], name: str) -> None:
    """The median CPU per event of a layout, and the rate it implies on cores of its own."""
    spent = {
        key.removeprefix(f"{name}_cpu_"): value
        for key, value in f.items()
        if key.startswith(f"{name}_cpu_")
    }
    if spent:
        cores = os.cpu_count() or 1
        print(
            f"      CPU per event: {cpu_line(spent)}; {cores} cores of its own would carry"
            f" {cores * 1e6 / sum(spent.values()):,.0f} events/s"
        )


def report(f: dict[str, float], vehicles: int, repeat: int) -> None:
    ceiling = f["ceiling"]
    batch = f["batch"]
    grouped = f["grouped"]
    single = f["single_accepted"] / f["single_seconds"]
    met = batch >= GOAL_EVENTS_PER_SECOND and batch >= ceiling / 4
    met_grouped = grouped >= GOAL_EVENTS_PER_SECOND and grouped >= ceiling / 4
    print(
        f"\nevents: {int(f['events']):,} per run, medians of {repeat} runs (min-max)"
        f" (stored after the run: {int(f['stored_events']):,})"
    )
    print(
        f"  ceiling (binary COPY into timeline_events): {ceiling:>10,.0f} events/s"
        f"  ({f['ceiling_min']:,.0f}-{f['ceiling_max']:,.0f})"
    )
    print(
        f"  endpoint, batches of {BATCH}, each event moves its vehicle's status:"
        f" {batch:>8,.0f} events/s ({f['batch_min']:,.0f}-{f['batch_max']:,.0f})"
        f"  ratio {batch / ceiling:.2f}  (503s: {int(f['batch_503'])})"
        f"  goal >= {GOAL_EVENTS_PER_SECOND:,} and >= 0.25: {'met' if met else 'NOT met'}"
    )
    report_cpu(f, "batch")
    print(
        f"  endpoint, batches of {BATCH}, a vehicle's 3 events in one batch:"
        f" {grouped:>8,.0f} events/s ({f['grouped_min']:,.0f}-{f['grouped_max']:,.0f})"
        f"  ratio {grouped / ceiling:.2f}  (503s: {int(f['grouped_503'])})"
        f"  goal: {'met' if met_grouped else 'NOT met'}"
    )
    report_cpu(f, "grouped")
    print(
        f"  endpoint, single-event requests ({int(f['single_events']):,}): {single:>7,.0f}"
        f" events/s  ratio {single / ceiling:.3f}  (503s: {int(f['single_503'])})"
    )
    report_cpu(f, "single")
    fleet = f["fleet"]
    first = fleet / f["hb_first_seconds"]
    narrow = fleet / f["hb_narrow_seconds"]
    wide = fleet / f["hb_wide_seconds"]
    sustained = 1 / (0.75 / narrow + 0.25 / wide)
    goal = vehicles / 60
    print(f"\nheartbeats: {int(fleet):,} vehicles, batches of {BATCH}")
    print(f"  first contact (narrow row created):      {first:>10,.0f} heartbeats/s")
    print(f"  steady, narrow row only (HOT update):    {narrow:>10,.0f} heartbeats/s")
    print(f"  every heartbeat rewrites the wide row:   {wide:>10,.0f} heartbeats/s")
    print(
        f"  one a minute, wide refresh every 240 s (3 narrow : 1 wide): {sustained:,.0f}/s"
        f" vs needed {goal:,.0f}/s: {'met' if sustained >= goal else 'NOT met'}"
        f"  (ratio {sustained / goal:.2f}; without the narrow table: {wide / goal:.2f})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vehicles", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--single", type=int, default=6_000, help="single-event requests")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of the ceiling and of each batch layout"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="`motorcade ingest --processes` (default: one per core)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args(argv)
    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    with localservers.bench_database(server, keep=args.keep) as (name, url):
        print(
            f"== ingest bench: database {name}, {args.vehicles:,} vehicles;"
            f" motorcade ingest: {args.processes} process(es); {args.clients} clients",
            flush=True,
        )
        seeded = seed_fleet(
            url,
            vehicles=args.vehicles,
            state_dir=localservers.STATE_DIR / "bench-ingest",
            only_if_empty=False,
        )
        print(f"  seeded in {seeded.seconds:.1f}s", flush=True)
        figures = asyncio.run(measure(url, args))
        report(figures, args.vehicles, args.repeat)


if __name__ == "__main__":
    main()
