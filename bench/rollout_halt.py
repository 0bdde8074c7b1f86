"""How fast a failing canary stops a rollout: from the telemetry's `202` to the rollout paused.

    .venv/bin/python bench/rollout_halt.py [--trials 20] [--rate 5000]

A fresh, migrated database (on the server at MOTORCADE_DATABASE_URL, else an embedded one
under .motorcade/bench-pgdata with `devtools.localservers.FLEET_SCALE_SETTINGS`; the first line
printed names the server's version and settings), seeded with the sample fleet. A Temporal dev
server (`temporal server start-dev`, the venv's binary, headless, on a free port), the real
worker (`motorcade worker`) and the real API (`motorcade api`, which serves `POST /telemetry`)
as child processes; their output goes to .motorcade/bench-rollout-halt/ (the last run's).

In the background, for the whole run, another process sends the telemetry of other vehicles
(not in any rollout) through `POST /telemetry` with a gateway token: `--rate` timeline events a
second (each vehicle's `desired_notified`, `apply_start`, `ready` on its current desired state,
round robin) and `--heartbeat-rate` heartbeats a second, in POSTs of `--batch` events, paced;
a POST answered 503 is resent after `Retry-After`. The rate it achieved is printed.

Each trial is one rollout over `4 + --wave` vehicles of their own (vehicleIds): canary 4,
bake 3600 s, then one wave of the rest (100%, bake 3600 s), `failureThreshold` 10% (pause),
`retry.maxAttempts` 1. The trial sends fresh heartbeats for them (parked, 90% battery), creates
the rollout (`POST /rollouts`, operator token), waits until the canary is issued, posts its 4
vehicles' `desired_notified` and `apply_start`, then their `failed` (`APPLY_FAILED`) in one
POST: the one that crosses the threshold. Measured: from that POST's `202` to the rollout's
row `paused` with `FAILURE_THRESHOLD` (polled every 5 ms), and the rollout's notified vehicles
(`rollout_targets` not `planned`, and the `notified` counter) before that POST, when the pause
is seen, and `--after` seconds later: none may be added. Then the rollout is aborted.

Baseline, in the same run, alternating with the trials: the same rollout, the same canary
events short of the failures, then an operator's `POST /rollouts/{id}/pause`: from sending it
to the row `paused` (its 202 comes once the workflow accepted the Update). The ratio says how
close the event-driven gate is to a direct operator pause.

Prints each trial, then p50, p90, p99 and max of both over the trials, the ratio, and the
notified counts. Goal (issue 18): p99 <= 5 s and p50 <= 1 s from the `202`, while the fleet
sends other telemetry at 5,000 events/s. No figure here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg

from bench.http11 import Http11
from core.auth import generate_dev_key, mint_dev_token
from core.temporal import dev_server_search_attribute_flags
from devtools import localservers
from devtools.seed import SAMPLE_RELEASES, id_width, seed_fleet, vehicle_id
from models.enums import Role

RELEASE = SAMPLE_RELEASES[-1].version
CANARY = 4
MAX_FAILURE_RATE = 0.1
POLL_SECONDS = 0.005
GOAL_P99, GOAL_P50 = 5.0, 1.0
KINDS = ("desired_notified", "apply_start", "ready")


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- The background fleet (a process of its own) --------------------------------------------


@dataclass
class LoadPlan:
    base: str
    token: str
    vehicles: list[tuple[str, str, str]]  # id, desired state id, release it runs
    rate: float
    heartbeat_rate: float
    batch: int
    clients: int


class LoadCounters:
    """Shared with the load process: what the API accepted (202), 503s, other errors."""

    def __init__(self, ctx: Any) -> None:
        self.events = ctx.Value("q", 0)
        self.heartbeats = ctx.Value("q", 0)
        self.overloaded = ctx.Value("q", 0)
        self.errors = ctx.Value("q", 0)
        self.posts = ctx.Value("q", 0)
        self.post_seconds = ctx.Value("d", 0.0)  # summed over the accepted POSTs

    def snapshot(self) -> tuple[float, int, int]:
        return time.perf_counter(), int(self.events.value), int(self.heartbeats.value)


def background_load(plan: LoadPlan, counters: LoadCounters, stop: Any) -> None:
    asyncio.run(_load(plan, counters, stop))


async def _load(plan: LoadPlan, counters: LoadCounters, stop: Any) -> None:
    """POSTs of `batch` events (and their share of heartbeats) on a fixed schedule; a client
    that falls more than a second behind skips slots instead of bursting."""
    posts_per_second = plan.rate / plan.batch
    beats_per_post = round(plan.heartbeat_rate / posts_per_second)
    n = len(plan.vehicles)
    epoch = int(time.time())  # this run's counters: a new epoch, each from 1
    seq = [0] * n
    cursor = {"event": 0, "beat": 0, "slot": 0}
    started = time.perf_counter()

    def body() -> bytes:
        events, beats = [], []
        for _ in range(plan.batch):
            i = cursor["event"] % n
            vid, ds, release = plan.vehicles[i]
            seq[i] += 1
            kind = KINDS[(cursor["event"] // n) % len(KINDS)]
            cursor["event"] += 1
            events.append(
                {
                    "eventId": str(uuid.uuid4()),
                    "vehicleId": vid,
                    "seq": seq[i],
                    "epoch": epoch,
                    "type": kind,
                    "occurredAt": iso_now(),
                    "desiredStateId": ds,
                    "releaseVersion": release,
                    "details": {"bench": "background"},
                }
            )
        for _ in range(beats_per_post):
            vid, _, release = plan.vehicles[cursor["beat"] % n]
            cursor["beat"] += 1
            beats.append(
                {
                    "vehicleId": vid,
                    "sentAt": iso_now(),
                    "batteryPercent": 80,
                    "stationary": True,
                    "actualReleaseVersion": release,
                }
            )
        return json.dumps({"events": events, "heartbeats": beats}).encode()

    async def client() -> None:
        http = Http11(plan.base, plan.token)
        try:
            while not stop.is_set():
                behind = (time.perf_counter() - started) * posts_per_second - cursor["slot"]
                if behind > posts_per_second:  # over a second late: drop the backlog
                    cursor["slot"] += int(behind)
                slot = cursor["slot"]
                cursor["slot"] += 1
                delay = started + slot / posts_per_second - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await _post(http, body(), counters)
        finally:
            await http.close()

    await asyncio.gather(*(client() for _ in range(plan.clients)))


async def _post(http: Http11, payload: bytes, counters: LoadCounters) -> None:
    while True:
        started = time.perf_counter()
        try:
            status, headers, data = await http.post("/api/v1/telemetry", payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counters.errors.value += 1
            await http.close()
            await asyncio.sleep(0.5)
            continue
        if status == 503:
            counters.overloaded.value += 1
            await asyncio.sleep(float(headers.get("retry-after", "1")))
            continue
        if status != 202:
            counters.errors.value += 1
            print(f"background POST refused: {status} {data[:200]!r}", file=sys.stderr)
            return
        sent = json.loads(payload)
        counters.events.value += len(sent["events"])
        counters.heartbeats.value += len(sent["heartbeats"])
        counters.posts.value += 1
        counters.post_seconds.value += time.perf_counter() - started
        return


# --- The stack: Temporal dev server, worker, API --------------------------------------------


@dataclass
class Stack:
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = open(self.logs / f"{name}.log", "ab")  # the child writes to it
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=str(localservers.PROJECT_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited ({proc.returncode}): see {self.logs}/{name}.log")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            localservers.stop_process(proc)  # type: ignore[arg-type]


def start_stack(url: str, dev_key: str, state_dir: Path) -> tuple[Stack, str]:
    """The Temporal dev server, `motorcade worker` and `motorcade api` on free ports; returns
    the stack and the API's base URL once it is ready."""
    stack = Stack(state_dir)
    temporal_port, api_port = localservers.free_port(), localservers.free_port()
    temporal = localservers.venv_binary("temporal")
    stack.spawn(
        "temporal",
        [
            *(temporal, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(temporal_port)),
            *("--headless", "--log-level", "error", *dev_server_search_attribute_flags()),
        ],
        dict(os.environ),
    )
    localservers.wait_for_port("127.0.0.1", temporal_port, timeout=60)
    env = {
        **os.environ,
        "MOTORCADE_DATABASE_URL": url,
        "MOTORCADE_DEV_KEY": dev_key,
        "MOTORCADE_ENV": "test",
        "MOTORCADE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "MOTORCADE_LOG_FORMAT": "json",
        "MOTORCADE_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "MOTORCADE_TRUSTED_KEYS_FILE": str(state_dir / "trusted-keys.json"),
        # The bench's own writes (two rollouts, a pause and two aborts per trial) stay under
        # any limit: the figures are the gate's, not the rate limiter's.
        "MOTORCADE_RATE_LIMIT_WRITE_BURST": "100000",
        "MOTORCADE_RATE_LIMIT_WRITES_PER_MINUTE": "100000",
        # Nor the background telemetry (one gateway token at --rate events/s).
        "MOTORCADE_RATE_LIMIT_GATEWAY_TELEMETRY_ITEMS_PER_MINUTE": "0",
        "MOTORCADE_RATE_LIMIT_DEVICE_TELEMETRY_ITEMS_PER_MINUTE": "0",
    }
    cli = [sys.executable, "-m", "core.cli"]
    stack.spawn("worker", [*cli, "worker"], env)
    stack.spawn("api", [*cli, "api", "--host", "127.0.0.1", "--port", str(api_port)], env)
    base = f"http://127.0.0.1:{api_port}"
    try:
        asyncio.run(localservers.wait_http_ready(base, within=90))
    except TimeoutError:
        stack.check()
        raise
    return stack, base


# --- One trial ------------------------------------------------------------------------------


@dataclass
class Trial:
    kind: str  # "gate" or "pause"
    rollout_id: int
    from_202: float | None  # seconds from the 202 to the paused row (None: not within timeout)
    from_send: float | None  # seconds from sending the request to the paused row
    status: str
    reason: str | None
    notified: tuple[int, int, int]  # targets issued: before, at the pause, `--after` later
    counter: tuple[int, int, int]  # the rollout's `notified` counter, the same moments
    background: float  # background events/s over the trial


class Bench:
    def __init__(self, base: str, url: str, dev_key: str, args: argparse.Namespace) -> None:
        self.args = args
        self.http = httpx.Client(base_url=base, timeout=60)
        self.db = psycopg.connect(url, autocommit=True)
        self.operator = _bearer(mint_dev_token(dev_key, role=Role.OPERATOR, subject="bench"))
        self.gateway = _bearer(mint_dev_token(dev_key, role=Role.GATEWAY, subject="bench"))
        self.epoch = int(time.time())  # each run's counter: a new epoch, from 1
        self.seq = 0

    def telemetry(self, *, events: list[dict] | None = None, beats: list[dict] | None = None):  # type: ignore[no-untyped-def]
        r = self.http.post(
            "/api/v1/telemetry",
            headers=self.gateway,
            json={"events": events or [], "heartbeats": beats or []},
        )
        assert r.status_code == 202, r.text
        return r

    def event(self, vid: str, kind: str, ds: str, reason: str | None = None) -> dict[str, Any]:
        self.seq += 1
        return {
            "eventId": str(uuid.uuid4()),
            "vehicleId": vid,
            "seq": self.seq,
            "epoch": self.epoch,
            "type": kind,
            "occurredAt": iso_now(),
            "desiredStateId": ds,
            "releaseVersion": RELEASE,
            "reasonCode": reason,
            "details": {"bench": "canary"},
        }

    def create_rollout(self, ids: list[str]) -> int:
        beats = [
            {
                "vehicleId": vid,
                "sentAt": iso_now(),
                "batteryPercent": 90,
                "stationary": True,
                "actualReleaseVersion": SAMPLE_RELEASES[0].version,
            }
            for vid in ids
        ]
        self.telemetry(beats=beats)  # what the server's safety checks read
        body = {
            "name": "bench rollout_halt",
            "releaseVersion": RELEASE,
            "targets": {"vehicleIds": ids},
            "strategy": {
                "canary": {"size": CANARY, "bakeSeconds": 3600},
                "waves": [{"percent": 100, "bakeSeconds": 3600}],
            },
            "gates": {"failureThreshold": {"maxFailureRate": MAX_FAILURE_RATE, "action": "pause"}},
            "retry": {"maxAttempts": 1},
        }
        r = self.http.post("/api/v1/rollouts", headers=self.operator, json=body)
        assert r.status_code == 201, r.text
        return int(r.json()["data"]["id"])

    def canary_issued(self, rollout_id: int, within: float = 120) -> list[tuple[str, str]]:
        """The canary's (vehicle, desired state) once all of them are notified."""
        deadline = time.monotonic() + within
        while True:
            rows = self.db.execute(
                "SELECT vehicle_id, desired_state_id::text FROM rollout_targets"
                " WHERE rollout_id = %s AND stage = 0 AND state = 'notified'",
                (rollout_id,),
            ).fetchall()
            if len(rows) == CANARY:
                return [(r[0], r[1]) for r in rows]
            if time.monotonic() > deadline:
                raise SystemExit(f"rollout {rollout_id}: the canary was not issued: {rows}")
            time.sleep(0.05)

    def issued(self, rollout_id: int) -> tuple[int, int]:
        """(targets issued so far, the rollout's `notified` counter)."""
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM rollout_targets WHERE rollout_id = %s"
            " AND state <> 'planned'), notified FROM rollouts WHERE id = %s",
            (rollout_id, rollout_id),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def wait_paused(self, rollout_id: int, reason: str) -> tuple[float | None, str, str | None]:
        """(perf_counter when the row says paused for `reason`, else None after the timeout;
        the status and reason last read)."""
        deadline = time.perf_counter() + self.args.timeout
        while True:
            row = self.db.execute(
                "SELECT status, status_reason FROM rollouts WHERE id = %s", (rollout_id,)
            ).fetchone()
            assert row is not None
            now = time.perf_counter()
            if row[0] == "paused" and row[1] == reason:
                return now, row[0], row[1]
            if now > deadline:
                return None, row[0], row[1]
            time.sleep(POLL_SECONDS)

    def abort(self, rollout_id: int) -> None:
        r = self.http.post(
            f"/api/v1/rollouts/{rollout_id}/abort",
            headers=self.operator,
            json={"reason": "bench trial done"},
        )
        if r.status_code not in (202, 409):
            print(f"  abort of rollout {rollout_id}: {r.status_code} {r.text[:200]}")

    def trial(self, kind: str, ids: list[str], counters: LoadCounters) -> Trial:
        load_start = counters.snapshot()
        rollout_id = self.create_rollout(ids)
        canary = self.canary_issued(rollout_id)
        self.telemetry(
            events=[self.event(v, k, ds) for v, ds in canary for k in KINDS[:2]]
        )  # applying: short of any outcome
        time.sleep(0.5)
        before = self.issued(rollout_id)
        sent = time.perf_counter()
        if kind == "gate":
            failed = [self.event(v, "failed", ds, "APPLY_FAILED") for v, ds in canary]
            self.telemetry(events=failed)
            expected = "FAILURE_THRESHOLD"
        else:
            r = self.http.post(
                f"/api/v1/rollouts/{rollout_id}/pause",
                headers=self.operator,
                json={"reason": "bench baseline"},
            )
            assert r.status_code == 202, r.text
            expected = "OPERATOR"
        acknowledged = time.perf_counter()
        paused_at, status, reason = self.wait_paused(rollout_id, expected)
        at_pause = self.issued(rollout_id)
        time.sleep(self.args.after)
        later = self.issued(rollout_id)
        load_end = counters.snapshot()
        self.abort(rollout_id)
        return Trial(
            kind=kind,
            rollout_id=rollout_id,
            from_202=None if paused_at is None else paused_at - acknowledged,
            from_send=None if paused_at is None else paused_at - sent,
            status=status,
            reason=reason,
            notified=(before[0], at_pause[0], later[0]),
            counter=(before[1], at_pause[1], later[1]),
            background=(load_end[1] - load_start[1]) / (load_end[0] - load_start[0]),
        )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- Figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least `q` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: Sequence[float]) -> str:
    if not values:
        return "no value"
    return "  ".join(
        f"{name} {percentile(values, q):6.3f} s"
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
    )


def show(trial: Trial, number: int) -> None:
    def secs(value: float | None) -> str:
        return "  (none)" if value is None else f"{value:7.3f}"

    print(
        f"  {trial.kind:<5} {number:>3}: rollout {trial.rollout_id:>3} {trial.status}"
        f" {trial.reason or '-':<17} from 202 {secs(trial.from_202)} s, from send"
        f" {secs(trial.from_send)} s; issued {trial.notified[0]} -> {trial.notified[1]} ->"
        f" {trial.notified[2]} (counter {trial.counter[0]} -> {trial.counter[1]} ->"
        f" {trial.counter[2]}); background {trial.background:,.0f} events/s",
        flush=True,
    )


def report(trials: list[Trial], load: dict[str, float], args: argparse.Namespace) -> None:
    gate = [t for t in trials if t.kind == "gate"]
    pause = [t for t in trials if t.kind == "pause"]
    halts = [t.from_202 for t in gate if t.from_202 is not None]
    halts_send = [t.from_send for t in gate if t.from_send is not None]
    base_send = [t.from_send for t in pause if t.from_send is not None]
    base_202 = [t.from_202 for t in pause if t.from_202 is not None]
    missed = len(gate) - len(halts)
    print(f"\n{len(gate)} trials, canary {CANARY} of {CANARY + args.wave} vehicles each")
    print(
        f"  failure threshold, 202 of the crossing telemetry -> paused:  {spread(halts)}"
        + (f"  ({missed} not paused within {args.timeout:.0f} s)" if missed else "")
    )
    print(f"  the same, from sending that telemetry:                       {spread(halts_send)}")
    print(f"  baseline: POST /pause sent -> paused (operator):             {spread(base_send)}")
    print(f"  baseline: its 202 -> paused:                                 {spread(base_202)}")
    if halts and base_send:
        print(
            f"  ratio gate / operator pause: p50"
            f" {percentile(halts, 0.5) / percentile(base_send, 0.5):.1f}x, p99"
            f" {percentile(halts, 0.99) / percentile(base_send, 0.99):.1f}x"
        )
    grew = [t for t in trials if t.notified[2] > t.notified[0] or t.counter[2] > t.counter[0]]
    print(
        f"  vehicles issued after the crossing telemetry or the pause: "
        f"{sum(t.notified[2] - t.notified[0] for t in trials)} in {len(grew)} of"
        f" {len(trials)} rollouts (counter +{sum(t.counter[2] - t.counter[0] for t in trials)})"
    )
    print(
        f"  background: {load['events']:,.0f} events/s and {load['heartbeats']:,.0f}"
        f" heartbeats/s achieved (asked {args.rate:,.0f} and {args.heartbeat_rate:,.0f}),"
        f" {args.clients} connections, mean POST {load['post_ms']:.0f} ms;"
        f" 503s {load['overloaded']:.0f}, errors {load['errors']:.0f}"
    )
    if halts and not missed:
        met = percentile(halts, 0.99) <= GOAL_P99 and percentile(halts, 0.5) <= GOAL_P50
        print(
            f"  goal p99 <= {GOAL_P99:.0f} s and p50 <= {GOAL_P50:.0f} s:"
            f" {'met' if met else 'NOT met'}"
        )
    else:
        print("  goal: NOT met (a rollout did not pause)")


# --- Main -----------------------------------------------------------------------------------


def background_vehicles(url: str, ids: list[str]) -> list[tuple[str, str, str]]:
    """The vehicles' (id, desired state, release they run)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, desired_state_id::text, actual_release_version FROM vehicles"
            " WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def run(url: str, args: argparse.Namespace, state_dir: Path) -> None:
    per_rollout = CANARY + args.wave
    fleet = args.background_vehicles + 2 * args.trials * per_rollout
    width = id_width(fleet)
    seeded = seed_fleet(url, vehicles=fleet, state_dir=state_dir)
    print(f"  seeded {fleet:,} vehicles in {seeded.seconds:.1f} s", flush=True)
    dev_key = generate_dev_key()
    stack, base = start_stack(url, dev_key, state_dir)
    print(f"  stack up: API {base}, logs in {state_dir}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    counters = LoadCounters(ctx)
    stop = ctx.Event()
    plan = LoadPlan(
        base=base,
        token=mint_dev_token(dev_key, role=Role.GATEWAY, subject="bench-fleet"),
        vehicles=background_vehicles(
            url, [vehicle_id(i, width) for i in range(1, args.background_vehicles + 1)]
        ),
        rate=args.rate,
        heartbeat_rate=args.heartbeat_rate,
        batch=args.batch,
        clients=args.clients,
    )
    loader = ctx.Process(target=background_load, args=(plan, counters, stop), daemon=True)
    loader.start()
    trials: list[Trial] = []
    try:
        time.sleep(3)  # the background reaches its pace
        bench = Bench(base, url, dev_key, args)
        first = counters.snapshot()
        for number in range(args.trials):
            for offset, kind in enumerate(("gate", "pause")):
                start = args.background_vehicles + (2 * number + offset) * per_rollout + 1
                ids = [vehicle_id(i, width) for i in range(start, start + per_rollout)]
                stack.check()
                trials.append(bench.trial(kind, ids, counters))
                show(trials[-1], number + 1)
        last = counters.snapshot()
    finally:
        stop.set()
        loader.join(30)
        stack.stop()
    seconds = last[0] - first[0]
    load = {
        "events": (last[1] - first[1]) / seconds,
        "heartbeats": (last[2] - first[2]) / seconds,
        "overloaded": float(counters.overloaded.value),
        "errors": float(counters.errors.value),
        "post_ms": 1000 * counters.post_seconds.value / max(1, counters.posts.value),
    }
    report(trials, load, args)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=20, help="rollouts halted by the gate")
    parser.add_argument("--wave", type=int, default=200, help="vehicles after the canary")
    parser.add_argument("--rate", type=float, default=5000, help="background events/s")
    parser.add_argument(
        "--heartbeat-rate", type=float, default=1000, help="background heartbeats/s"
    )
    parser.add_argument("--batch", type=int, default=100, help="background events per POST")
    parser.add_argument("--clients", type=int, default=16, help="background connections")
    parser.add_argument("--background-vehicles", type=int, default=10_000)
    parser.add_argument("--after", type=float, default=2.0, help="seconds watched after a pause")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for a pause")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args(argv)
    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    state_dir = localservers.STATE_DIR / "bench-rollout-halt"  # logs of the last run
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    with localservers.bench_database(server, keep=args.keep) as (name, url):
        print(
            f"== rollout halt bench: database {name}, {args.trials} trials, background"
            f" {args.rate:,.0f} events/s + {args.heartbeat_rate:,.0f} heartbeats/s",
            flush=True,
        )
        run(url, args, state_dir)


if __name__ == "__main__":
    main()
