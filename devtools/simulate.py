"""`motorcade simulate`: a fleet of simulated vehicles, thousands per process (asyncio).

Each vehicle polls its desired state (`GET /vehicles/{id}/desired-state` with its own device
token, `If-None-Match`), and when it names a release the vehicle does not run:
`desired_notified`, then the safety checks at apply time, then `apply_start`, and after the
apply time either `failed` (with `APPLY_FAILED`, or `NETWORK_UNREACHABLE` on a network loss) or
`ready` (it then runs the release and its heartbeats say so). Heartbeats every
`--heartbeat-seconds`; some vehicles go offline for a while (no heartbeat, no poll).

The safety checks are the desired state's `constraints` when it carries them
(`minBatteryPercent`, `requireStationary`, `maintenanceWindow`: the window rule is
`workflows.policy.window_open`, the server's own), else the simulator's battery floor
(`MOTORCADE_SAFETY_MIN_BATTERY_PERCENT`) and "parked". A check that fails reports `blocked`
with `BATTERY_LOW`, `NOT_STATIONARY` or `OUTSIDE_MAINTENANCE_WINDOW`, once per desired state
and reason; the vehicle checks again at every poll (meanwhile it charges or parks) and applies
once they pass.

A vehicle applying release `V` fails with `APPLY_FAILED` with probability
`release_failure_rates[V]` (`--release-failure-rate V=RATE`) when given, else `failure_rate`.
Apply outcomes are drawn from a random stream of their own per vehicle, seeded from `--seed`
and the vehicle id: with a seed, the same vehicle's n-th apply has the same outcome in every
run, whatever the timing.

Telemetry goes through one gateway in the process (a gateway token): heartbeats and events of
all vehicles are batched (up to 500 events and 500 heartbeats, every 200 ms) into
`POST /telemetry`; on 503 the batch is resent after the server's `Retry-After`, on a network
error after a backoff, with the same event ids (the server deduplicates), so nothing a
vehicle reported is lost. Each run is a new `epoch` (its start, in Unix seconds) whose `seq`
counts from 1, so a restarted simulator's events order after the last run's
(docs/telemetry.md, "Clocks and counters").

On a terminal, a progress line shows the vehicles by state and the traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from core.aio import wait_event
from core.auth import mint_dev_token
from models.enums import Role
from models.workflows import MaintenanceWindowSpec
from workflows.policy import window_open

MAX_BATCH = 500


@dataclass
class SimConfig:
    api: str = "http://127.0.0.1:8000"
    vehicles: int | None = None  # None: every vehicle the API lists
    id_prefix: str | None = None  # only vehicles whose id starts with this
    failure_rate: float = 0.05
    release_failure_rates: dict[str, float] = field(default_factory=dict)
    low_battery_rate: float = 0.03
    moving_rate: float = 0.05
    network_loss_rate: float = 0.01
    offline_rate: float = 0.002  # chance per heartbeat to go offline for a while
    offline_seconds: float = 600.0
    heartbeat_seconds: float = 60.0
    poll_seconds: float = 30.0
    apply_seconds: float = 20.0
    min_battery_percent: int = 30
    duration: float | None = None
    seed: int | None = None


@dataclass
class Stats:
    events: int = 0
    heartbeats: int = 0
    posts: int = 0
    overloaded: int = 0
    errors: int = 0
    polls: int = 0
    states: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Constraints:
    """The safety checks a vehicle applies before installing: the desired state's
    `constraints`, each one it lacks (or all, on an old row without any) from the simulator's
    defaults: its battery floor, parked required, no window."""

    min_battery_percent: int
    require_stationary: bool = True
    window: MaintenanceWindowSpec | None = None

    @classmethod
    def read(cls, data: Mapping[str, Any] | None, *, default_min_battery: int) -> Constraints:
        """From the desired state's `constraints` (camelCase JSON, or None); ValueError when
        it is malformed."""
        data = data or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"constraints is not an object: {data!r}")
        battery = data.get("minBatteryPercent")
        stationary = data.get("requireStationary")
        window = data.get("maintenanceWindow")
        checks = cls(
            min_battery_percent=default_min_battery if battery is None else int(battery),
            require_stationary=True if stationary is None else bool(stationary),
            window=MaintenanceWindowSpec.model_validate(window) if window else None,
        )
        try:  # a time or zone the window rule cannot read fails here, not at apply time
            window_open(datetime.now(UTC), checks.window)
        except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(f"unreadable maintenanceWindow {window!r}: {exc}") from None
        return checks

    def blocking(self, *, battery: int, stationary: bool, now: datetime) -> str | None:
        """The reason code of the first check that fails now, or None."""
        if battery < self.min_battery_percent:
            return "BATTERY_LOW"
        if self.require_stationary and not stationary:
            return "NOT_STATIONARY"
        if not window_open(now, self.window):
            return "OUTSIDE_MAINTENANCE_WINDOW"
        return None


def outcome_rng(seed: int | None, vehicle_id: str) -> random.Random:
    """The random stream of one vehicle's apply outcomes: from `seed` and the vehicle id when
    seeded (stable across runs and processes), else from the system."""
    if seed is None:
        return random.Random()
    digest = hashlib.sha256(f"{seed}:{vehicle_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Gateway:
    """Batches every simulated vehicle's telemetry into POST /telemetry (gateway token)."""

    def __init__(self, client: httpx.AsyncClient, token: str, stats: Stats) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"}
        self._stats = stats
        self._events: list[dict[str, Any]] = []
        self._beats: dict[str, dict[str, Any]] = {}  # coalesced: the latest per vehicle
        self._wake = asyncio.Event()

    def event(self, item: dict[str, Any]) -> None:
        self._events.append(item)
        if len(self._events) >= MAX_BATCH:
            self._wake.set()

    def heartbeat(self, item: dict[str, Any]) -> None:
        self._beats[item["vehicleId"]] = item
        if len(self._beats) >= MAX_BATCH:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not (stop.is_set() and not self._events and not self._beats):
            await wait_event(self._wake, 0.2)
            self._wake.clear()
            while self._events or self._beats:
                events, self._events = self._events[:MAX_BATCH], self._events[MAX_BATCH:]
                keys = list(self._beats)[:MAX_BATCH]
                beats = [self._beats.pop(k) for k in keys]
                await self._send({"heartbeats": beats, "events": events})

    async def _send(self, body: dict[str, Any]) -> None:
        delay = 0.5
        while True:
            try:
                r = await self._client.post("/api/v1/telemetry", json=body, headers=self._headers)
            except httpx.HTTPError:
                self._stats.errors += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
                continue
            if r.status_code == 202:
                self._stats.posts += 1
                self._stats.events += len(body["events"])
                self._stats.heartbeats += len(body["heartbeats"])
                return
            if r.status_code in (429, 503):
                self._stats.overloaded += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            # A refused batch (4xx) would be refused again: report it and drop it loudly.
            self._stats.errors += 1
            print(f"\ntelemetry refused: {r.status_code} {r.text[:300]}", file=sys.stderr)
            return


class Vehicle:
    def __init__(
        self,
        vid: str,
        actual: str | None,
        token: str,
        config: SimConfig,
        gateway: Gateway,
        client: httpx.AsyncClient,
        stats: Stats,
        rng: random.Random,
    ) -> None:
        self.id = vid
        self.actual = actual
        self.config = config
        self.gateway = gateway
        self.client = client
        self.stats = stats
        self.rng = rng
        self.headers = {"Authorization": f"Bearer {token}"}
        self.etag: str | None = None
        # Nothing persists between runs: each run's counter is a new epoch (its start, Unix
        # seconds), counting from 1 (docs/telemetry.md, "Clocks and counters").
        self.epoch = int(time.time())
        self.seq = 0
        self.state = "idle"
        self.battery = rng.randint(20, 100) if rng.random() < config.low_battery_rate else 80
        self.stationary = rng.random() >= config.moving_rate
        self.done_ds: str | None = None
        self.blocked_on: tuple[str, str] | None = None  # (desired state, reason) reported
        self.outcomes = outcome_rng(config.seed, vid)
        self.offline_until = 0.0
        stats.states["idle"] += 1

    def _set(self, state: str) -> None:
        self.stats.states[self.state] -= 1
        self.state = state
        self.stats.states[state] += 1

    def _event(self, kind: str, ds: str, release: str, reason: str | None = None) -> None:
        self.seq += 1
        self.gateway.event(
            {
                "eventId": str(uuid.uuid4()),
                "vehicleId": self.id,
                "seq": self.seq,
                "epoch": self.epoch,
                "type": kind,
                "occurredAt": iso_now(),
                "desiredStateId": ds,
                "releaseVersion": release,
                "reasonCode": reason,
                "details": {"simulated": True},
            }
        )

    def _heartbeat(self) -> None:
        self.gateway.heartbeat(
            {
                "vehicleId": self.id,
                "sentAt": iso_now(),
                "batteryPercent": self.battery,
                "stationary": self.stationary,
                "actualReleaseVersion": self.actual,
            }
        )

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        await asyncio.sleep(self.rng.random() * min(cfg.heartbeat_seconds, cfg.poll_seconds))
        next_beat = next_poll = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now < self.offline_until:
                await asyncio.sleep(min(5.0, self.offline_until - now))
                continue
            if self.state == "offline":
                self._set("idle")
            if now >= next_beat:
                self._wander()
                self._heartbeat()
                next_beat = now + cfg.heartbeat_seconds * self.rng.uniform(0.9, 1.1)
                if self.rng.random() < cfg.offline_rate:
                    self.offline_until = now + cfg.offline_seconds * self.rng.uniform(0.5, 1.5)
                    self._set("offline")
                    continue
            if now >= next_poll:
                next_poll = now + cfg.poll_seconds * self.rng.uniform(0.8, 1.2)
                await self._poll()
            await asyncio.sleep(max(0.05, min(next_beat, next_poll) - time.monotonic()))

    def _wander(self) -> None:
        """Battery and motion drift a little between heartbeats."""
        if self.rng.random() < 0.1:  # it drives off or parks now and then
            self.stationary = self.rng.random() >= self.config.moving_rate
        self.battery = max(5, min(100, self.battery + self.rng.choice((-1, 0, 0, 1, 2))))

    async def _poll(self) -> None:
        headers = dict(self.headers)
        if self.etag:
            headers["If-None-Match"] = self.etag
        try:
            r = await self.client.get(f"/api/v1/vehicles/{self.id}/desired-state", headers=headers)
        except httpx.HTTPError:
            self.stats.errors += 1
            return
        self.stats.polls += 1
        if r.status_code == 304:
            return
        if r.status_code != 200:
            self.stats.errors += 1
            return
        data = r.json()["data"]
        ds, release = data.get("desiredStateId"), data.get("releaseVersion")
        if not ds or not release or release == self.actual or ds == self.done_ds:
            self.etag = r.headers.get("etag")
            return
        try:
            constraints = Constraints.read(
                data.get("constraints"), default_min_battery=self.config.min_battery_percent
            )
        except ValueError as exc:  # pydantic's ValidationError is one
            self.stats.errors += 1
            print(f"\n{self.id}: unreadable constraints: {exc}", file=sys.stderr)
            return
        outcome = await self.apply(ds, release, constraints)
        if outcome != "blocked":  # blocked: look again at the next poll
            self.etag = r.headers.get("etag")
            self.done_ds = ds

    async def apply(self, ds: str, release: str, constraints: Constraints) -> str:
        """Install desired state `ds` (release `release`) if `constraints` let it now, and
        report each step; returns the outcome: `blocked`, `failed` or `ready`."""
        cfg = self.config
        reason = constraints.blocking(
            battery=self.battery, stationary=self.stationary, now=datetime.now(UTC)
        )
        if reason is not None and self.blocked_on == (ds, reason):
            self._wait_out(reason)  # reported already: check again at the next poll
            return "blocked"
        self._event("desired_notified", ds, release)
        self._set("updating")
        if reason is not None:
            self._event("blocked", ds, release, reason)
            self._set("blocked")
            self.blocked_on = (ds, reason)
            self._wait_out(reason)
            return "blocked"
        self.blocked_on = None
        self._event("apply_start", ds, release)
        await asyncio.sleep(cfg.apply_seconds * self.rng.uniform(0.5, 1.5))
        rate = cfg.release_failure_rates.get(release, cfg.failure_rate)
        lost, failed = self.outcomes.random(), self.outcomes.random()
        if lost < cfg.network_loss_rate:
            self._event("failed", ds, release, "NETWORK_UNREACHABLE")
            self._set("failed")
            return "failed"
        if failed < rate:
            self._event("failed", ds, release, "APPLY_FAILED")
            self._set("failed")
            return "failed"
        self.actual = release
        self._event("ready", ds, release)
        self._heartbeat()
        self._set("ready")
        return "ready"

    def _wait_out(self, reason: str) -> None:
        """What a blocked vehicle does before it checks again: it charges, or parks; a closed
        window only passes."""
        if reason == "BATTERY_LOW":
            self.battery = min(100, self.battery + 15)
        elif reason == "NOT_STATIONARY":
            self.stationary = True


async def list_fleet(
    client: httpx.AsyncClient, viewer: str, limit: int | None, prefix: str | None = None
) -> list[tuple[str, str | None]]:
    """Every vehicle the API lists (keyset pages), with the release it runs."""
    out: list[tuple[str, str | None]] = []
    cursor: str | None = None
    while limit is None or len(out) < limit:
        params: dict[str, Any] = {"limit": 500}
        if prefix:
            params["q"] = prefix
        if cursor:
            params["cursor"] = cursor
        r = await client.get(
            "/api/v1/vehicles", params=params, headers={"Authorization": f"Bearer {viewer}"}
        )
        r.raise_for_status()
        body = r.json()
        out += [(v["id"], v["actual"]["releaseVersion"]) for v in body["data"]]
        cursor = body["metadata"]["nextCursor"]
        if not cursor:
            break
    return out[:limit] if limit is not None else out


def progress_line(stats: Stats, started: float, vehicles: int) -> str:
    elapsed = max(0.001, time.monotonic() - started)
    states = " ".join(
        f"{name} {stats.states[name]:,}"
        for name in ("idle", "updating", "blocked", "ready", "failed", "offline")
    )
    return (
        f"{vehicles:,} vehicles | {states} | events {stats.events:,} "
        f"heartbeats {stats.heartbeats:,} ({stats.heartbeats / elapsed:,.0f}/s) | "
        f"polls {stats.polls:,} | 503s {stats.overloaded:,} errors {stats.errors:,}"
    )


async def simulate(config: SimConfig, dev_key: str, *, audience: str = "motorcade") -> Stats:
    rng = random.Random(config.seed)
    stats = Stats()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=config.api, timeout=30, limits=limits) as client:
        viewer = mint_dev_token(dev_key, role=Role.VIEWER, audience=audience)
        fleet = await list_fleet(client, viewer, config.vehicles, config.id_prefix)
        gateway = Gateway(
            client,
            mint_dev_token(dev_key, role=Role.GATEWAY, audience=audience, subject="simulator"),
            stats,
        )
        vehicles = [
            Vehicle(
                vid,
                actual,
                mint_dev_token(
                    dev_key,
                    role=Role.DEVICE,
                    vehicle_id=vid,
                    audience=audience,
                    ttl_seconds=7 * 86400,
                ),
                config,
                gateway,
                client,
                stats,
                random.Random(rng.random()),
            )
            for vid, actual in fleet
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(v.run(stop)) for v in vehicles]
        sender = asyncio.create_task(gateway.run(stop))
        started = time.monotonic()
        tty = sys.stdout.isatty()
        try:
            interval = 1.0 if tty else 30.0
            while config.duration is None or time.monotonic() - started < config.duration:
                left = (
                    interval
                    if config.duration is None
                    else config.duration - (time.monotonic() - started)
                )
                await asyncio.sleep(max(0.0, min(interval, left)))
                line = progress_line(stats, started, len(vehicles))
                if tty:
                    sys.stdout.write("\r\033[K" + line)
                    sys.stdout.flush()
                else:
                    print(line, flush=True)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sender  # flush what the vehicles reported
            if tty:
                print()
    return stats
