"""A long run of the whole stack under a simulated fleet: memory, latency and errors over time.

    .venv/bin/python bench/soak.py [--minutes 30] [--warmup 5] [--window 5] [--vehicles 20000]
                                   [--rollout-every 180] [--read-rate 20] [--keep]

What runs, as `make dev` runs it (devtools/devstack.py), each on a free port, its output in
.motorcade/bench-soak/ (the last run's): the Temporal dev server (`temporal server start-dev`,
the venv's binary, its Web UI and a database file), `motorcade worker`, `motorcade api`
(without the ingest routes, `MOTORCADE_API_INGEST=false`, as docker-compose deploys it) and
`motorcade ingest`, on a fresh, migrated database (`motorcade_bench_soak_*` on the server at
MOTORCADE_DATABASE_URL, else on the embedded one under .motorcade/bench-pgdata with
`FLEET_SCALE_SETTINGS`; dropped at the end unless `--keep`) seeded with `--vehicles` vehicles.
The simulated fleet is `devtools.simulate` (what `motorcade simulate` runs) in `--simulators`
processes of its own (each a share of the fleet), with its defaults (5% apply failures, some
vehicles offline for a while, a heartbeat every `--heartbeat-seconds`, 60) but a desired-state
poll every `--poll-seconds` (120, not the simulator's 30: 20,000 vehicles polling every 30 s
are 667 requests/s, more than the client and one ingest process get of two shared cores), its
telemetry and polls sent to the ingest process; its HTTP client is wrapped to time every
request it makes, so the telemetry figures are the simulator's own `POST /telemetry` batches
(measured at the client: they include the simulator's own event-loop delays; the ingest's
`/metrics`, printed per window, say what the server itself took).

While it runs:

- a rollout every `--rollout-every` seconds through the REST API (operator token): a new
  release each time (registered with `POST /releases`, signed with the dev release key), one
  region as its targets, a region no active rollout of the run holds (else it waits), a
  canary of 20 and one wave, 30 s bakes, `timeouts.applySeconds` past a poll and an apply
  (twice `--poll-seconds` + 60 s: only a vehicle gone offline times out), no retry and
  lenient gates, so each can finish on the simulator's outcomes. A rollout whose status,
  stage and counts have not changed for `--stuck-after` seconds is reported (stuck) and
  aborted.
- a telemetry probe: `--probe-rate` POSTs a second of 50 heartbeats of 200 vehicles of its
  own (registered in a region of their own, `soak-probe`), from the soak's own mostly idle
  process over one keep-alive connection: what the server answers a light client.
- a reader (viewer token) at `--read-rate` requests a second over 4 keep-alive
  connections, round robin: `GET /vehicles?region=...`, `GET /vehicles?status=...`,
  `GET /rollouts/{id}` (the newest rollout) and `GET /fleet/summary`.
- every 10 s, the resident memory (RSS) of each process, summed over its process group
  (the ingest role's children, for example); PostgreSQL's backends on the bench database
  (their private memory, `RssAnon`: they come and go with the pools, so they are shown, not
  judged).

It prints the memory at the start, after `--warmup` minutes and at the end (and the end
against the warm-up in %), and each process's CPU per window; per `--window` minutes and
over the whole run the p50 / p99 / max of the reads, of the probe's telemetry `202`s, of the
simulator's telemetry `202`s and of its desired-state polls; the ingest's own /metrics per
window (group write and commit, `POST /telemetry` and the desired-state read inside the
server: count, mean, how many over 0.5 s); the answers by status code and error code for
reads, the probe, telemetry, polls and the rollout driver's calls ("controls"), every 5xx
counted; each rollout's outcome; the roles' log lines by level.

There is no in-run baseline (nothing to compare a long run against but itself): the "ratio"
is the end against the warm-up, for memory, and each window's p99 against the goal.

The warm-up is 15 minutes by default: rollouts last 10 to 20 minutes here (blocked vehicles
are notified again as their heartbeats pass), so it takes about that long until every region
holds one and the load is steady; the worker's memory steps up with the rollouts it holds
(122 -> 146 MiB from 2 to 5 in the first run, flat after).

Exits 1 if a goal of issue 20 fails: a process's memory past 10% above its warm-up level, any
5xx, a window's read p99 at or over 100 ms or probe telemetry `202` p99 at or over 500 ms
(the simulator's own figure is printed, not judged: it includes the delays of a client that
runs 10,000 vehicles in one event loop on two shared cores), a rollout stuck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import queue
import secrets
import shutil
import subprocess
import sys
import time
import types
from collections import Counter, defaultdict
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
from core.migrate import upgrade
from core.temporal import dev_server_search_attribute_flags
from devtools import localservers
from devtools.seed import (
    BASELINE_RELEASE,
    REGIONS,
    SIGNING_KEY_FILE,
    TRUSTED_KEYS_FILE,
    seed_fleet,
)
from models.enums import Role
from services.signing import load_or_create_signing_key, sign_release

MEMORY_LIMIT = 0.10  # end over warm-up
READ_P99_MS = 100.0
TELEMETRY_P99_MS = 500.0
SAMPLE_SECONDS = 10.0
TERMINAL = {"completed", "rolled_back", "aborted", "failed"}
CANARY = 20
PROBE_PREFIX = "SOAK-PROBE-"
PROBE_VEHICLES = 200
PROBE_BATCH = 50  # heartbeats per probe POST
POLL_SLOTS = 32  # desired-state polls in flight per simulator process


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least `q` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def error_code(body: bytes) -> str:
    """The error envelope's code, else `-`."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        error = json.loads(body)["error"]
        return str(error.get("code") or "-")
    return "-"


# --- What every request's answer is recorded as ------------------------------------------


@dataclass
class Sample:
    kind: str  # reads, telemetry, polls, controls
    at: float  # wall clock (time.time()) when sent
    ms: float | None  # None: no answer (a connection error)
    status: int  # 0: no answer
    code: str  # the error envelope's code, `-` for none


class Recorder:
    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def add(self, kind: str, at: float, ms: float | None, status: int, code: str = "-") -> None:
        self.samples.append(Sample(kind, at, ms, status, code))


# --- The simulated fleet, in a process of its own ----------------------------------------


@dataclass(frozen=True)
class SimPlan:
    ingest: str
    api: str
    dev_key: str
    seconds: float
    index: int  # this process's share of the fleet: every `count`-th vehicle from `index`
    count: int
    poll_seconds: float
    heartbeat_seconds: float
    log: str


def simulator_child(plan: SimPlan, out: Any, stop: Any) -> None:
    """`devtools.simulate.simulate` for a share of the fleet against the ingest process, its
    client timed; the samples go to `out` every 2 s as lists of tuples.

    The polls wait for one of POLL_SLOTS before they enter httpx's pool: with thousands of
    requests queued in it, httpcore's pool spends its time rescanning the queue (measured:
    20,000 vehicles in one process sent nothing in 5 minutes at 70% of a core). The gateway's
    telemetry does not wait there; its latency is the request's own."""
    sys.stdout = sys.stderr = open(plan.log, "a", buffering=1)
    if os.environ.get("SOAK_TRACEBACKS"):
        import faulthandler

        faulthandler.dump_traceback_later(30, repeat=True, file=sys.stderr)
    from devtools import simulate as sim

    poll_slots = asyncio.Semaphore(POLL_SLOTS)

    pending: list[tuple[str, float, float | None, int, str]] = []

    def kind_of(path: str) -> str:
        if path.endswith("/telemetry"):
            return "telemetry"
        if path.endswith("/desired-state"):
            return "polls"
        return "fleet-list"

    class TimedClient(httpx.AsyncClient):
        async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
            kind = kind_of(request.url.path)
            slot = poll_slots if kind == "polls" else contextlib.nullcontext()
            async with slot:
                return await self._timed(kind, request, **kwargs)

        async def _timed(self, kind: str, request: httpx.Request, **kwargs: Any) -> httpx.Response:
            at, started = time.time(), time.perf_counter()
            try:
                response = await super().send(request, **kwargs)
            except httpx.HTTPError:
                pending.append((kind, at, None, 0, type(sys.exc_info()[1]).__name__))
                raise
            ms = (time.perf_counter() - started) * 1000
            code = error_code(response.content) if response.status_code >= 400 else "-"
            pending.append((kind, at, ms, response.status_code, code))
            return response

    # The simulator's module sees the timed client; the fleet is listed through the API (the
    # ingest role serves telemetry and desired states only).
    sim.httpx = types.SimpleNamespace(**{**vars(httpx), "AsyncClient": TimedClient})  # type: ignore[assignment]
    list_fleet = sim.list_fleet

    async def list_through_api(_client: Any, viewer: str, limit: Any, prefix: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=plan.api, timeout=60) as client:
            fleet = await list_fleet(client, viewer, limit, prefix)
        fleet = [v for v in fleet if not v[0].startswith(PROBE_PREFIX)]
        return fleet[plan.index :: plan.count]

    sim.list_fleet = list_through_api  # type: ignore[assignment]

    async def main() -> None:
        config = sim.SimConfig(
            api=plan.ingest,
            duration=plan.seconds,
            poll_seconds=plan.poll_seconds,
            heartbeat_seconds=plan.heartbeat_seconds,
        )
        task = asyncio.create_task(sim.simulate(config, plan.dev_key))
        while not task.done():
            await asyncio.sleep(2)
            if pending:
                batch = pending[:]
                del pending[:]
                out.put(batch)
            if stop.is_set():
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if pending:
            out.put(pending[:])

    asyncio.run(main())


# --- The stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            argv,
            env=env,
            cwd=str(localservers.PROJECT_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: its memory is summed over the group
        )

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited ({proc.returncode}): see {self.logs}/{name}.log")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                localservers.stop_process(proc, timeout=20)


def start_stack(
    url: str, dev_key: str, metrics_token: str, state_dir: Path, args: argparse.Namespace
) -> tuple[Stack, str, str]:
    """Temporal, worker, API, ingest; returns the stack and the API's and ingest's base URLs
    once both are ready."""
    stack = Stack(state_dir)
    temporal_port, ui_port = localservers.free_port(), localservers.free_port()
    api_port, ingest_port = localservers.free_port(), localservers.free_port()
    stack.spawn(
        "temporal",
        [
            localservers.venv_binary("temporal"),
            *("server", "start-dev", "--ip", "127.0.0.1", "--port", str(temporal_port)),
            *("--ui-port", str(ui_port), "--db-filename", str(state_dir / "temporal.db")),
            *("--log-level", "error", *dev_server_search_attribute_flags()),
        ],
        dict(os.environ),
    )
    localservers.wait_for_port("127.0.0.1", temporal_port, timeout=60)
    env = {
        **os.environ,
        "MOTORCADE_ENV": "dev",
        "MOTORCADE_DATABASE_URL": url,
        "MOTORCADE_DEV_KEY": dev_key,
        "MOTORCADE_LOG_FORMAT": "json",
        "MOTORCADE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "MOTORCADE_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
        "MOTORCADE_TEMPORAL_UI_URL": f"http://127.0.0.1:{ui_port}",
        "MOTORCADE_TRUSTED_KEYS_FILE": str(state_dir / TRUSTED_KEYS_FILE),
        "MOTORCADE_API_INGEST": "false",
        "MOTORCADE_METRICS_TOKEN": metrics_token,
    }
    cli = [sys.executable, "-m", "core.cli"]
    stack.spawn("worker", [*cli, "worker"], env)
    stack.spawn("api", [*cli, "api", "--host", "127.0.0.1", "--port", str(api_port)], env)
    ingest = [*cli, "ingest", "--host", "127.0.0.1", "--port", str(ingest_port)]
    stack.spawn("ingest", [*ingest, "--processes", str(args.ingest_processes)], env)
    api, ingest_base = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ingest_port}"
    try:
        asyncio.run(localservers.wait_http_ready(api, within=90))
        asyncio.run(localservers.wait_http_ready(ingest_base, within=90))
    except TimeoutError:
        stack.check()
        raise
    return stack, api, ingest_base


# --- Memory --------------------------------------------------------------------------------


PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def _proc_table() -> list[tuple[int, int, int, float]]:
    """(pid, process group, RSS bytes, CPU seconds) of every process."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        rows.append((int(entry), int(fields[2]), int(statm[1]) * PAGE, cpu))
    return rows


def _run_wait(pids: list[int]) -> list[float]:
    """Per process, the seconds its main thread spent runnable, waiting for a CPU
    (/proc/PID/schedstat, second field): for a Python role, its event loop kept waiting."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9)
    return out


def _rss_anon(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Memory:
    """RSS per process (summed over its group), sampled every SAMPLE_SECONDS."""

    def __init__(self, groups: dict[str, int], single: dict[str, list[int]], db: str, url: str):
        self.groups = groups  # name: process group id
        self.single = single  # name: pids (no group of their own)
        self.db = db
        self.url = url
        self.series: list[tuple[float, dict[str, int]]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []  # CPU seconds so far
        # Seconds the processes' main threads were runnable but waited for a CPU, so far.
        self.wait: list[tuple[float, dict[str, float]]] = []
        self.backends: list[tuple[float, int, int]] = []  # (at, count, RssAnon summed)

    def sample(self) -> dict[str, int]:
        table = _proc_table()
        now: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name, pgid in self.groups.items():
            now[name] = sum(rss for _, group, rss, _ in table if group == pgid)
            cpu[name] = sum(c for _, group, _, c in table if group == pgid)
        for name, pids in self.single.items():
            now[name] = sum(rss for p, _, rss, _ in table if p in pids)
            cpu[name] = sum(c for p, _, _, c in table if p in pids)
        wait: dict[str, float] = {}
        for name, pgid in self.groups.items():
            wait[name] = sum(_run_wait([p for p, group, _, _ in table if group == pgid]))
        for name, pids in self.single.items():
            wait[name] = sum(_run_wait(pids))
        self.series.append((time.time(), now))
        self.cpu.append((time.time(), cpu))
        self.wait.append((time.time(), wait))
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True) as c:
            pids = [
                r[0]
                for r in c.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.db,),
                )
            ]
            self.backends.append((time.time(), len(pids), sum(_rss_anon(p) for p in pids)))
        return now

    def at(self, when: float) -> dict[str, int]:
        """The sample nearest `when`."""
        return min(self.series, key=lambda s: abs(s[0] - when))[1]

    def cpu_share(self, lo: float, hi: float, *, waiting: bool = False) -> dict[str, float]:
        """Each process's CPU between the samples nearest `lo` and `hi`, in % of one core
        (with `waiting`: the time its main threads waited for a CPU, in % of the time)."""
        series = self.wait if waiting else self.cpu
        a = min(series, key=lambda s: abs(s[0] - lo))
        b = min(series, key=lambda s: abs(s[0] - hi))
        wall = max(1e-6, b[0] - a[0])
        return {n: 100 * (b[1].get(n, 0) - a[1].get(n, 0)) / wall for n in b[1]}

    def backends_at(self, when: float) -> tuple[int, int]:
        if not self.backends:
            return 0, 0
        row = min(self.backends, key=lambda s: abs(s[0] - when))
        return row[1], row[2]


# --- The ingest process's own view (/metrics) ----------------------------------------------


SERVER_ROUTES = {  # (method, route template): the name shown
    ("POST", "/telemetry"): "POST /telemetry",
    ("GET", "/vehicles/{vehicle_id}/desired-state"): "GET desired-state",
}


@dataclass
class IngestView:
    """Cumulative figures of the ingest process's /metrics at one moment: per histogram
    (the group writes, and each route of SERVER_ROUTES) its count, its sum of seconds and
    how many took over 0.5 s."""

    at: float
    count: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    upto_half: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


def scrape_ingest(base: str, token: str) -> IngestView | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    view = IngestView(time.time())
    for family in text_string_to_metric_families(r.text):
        if family.name == "motorcade_ingest_group_seconds":
            name = "group write+commit"
        elif family.name != "motorcade_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if family.name != "motorcade_ingest_group_seconds":
                key = (sample.labels.get("method"), sample.labels.get("route"))
                if key not in SERVER_ROUTES:
                    continue
                name = SERVER_ROUTES[key]  # type: ignore[index]
            if sample.name.endswith("_count"):
                view.count[name] += sample.value
            elif sample.name.endswith("_sum"):
                view.seconds[name] += sample.value
            elif sample.name.endswith("_bucket") and sample.labels.get("le") == "0.5":
                view.upto_half[name] += sample.value
    return view


def ingest_delta(a: IngestView, b: IngestView) -> str:
    """Between two views: per histogram, its count, mean and count over 0.5 s."""
    parts = []
    for name in ("group write+commit", *SERVER_ROUTES.values()):
        n = b.count[name] - a.count[name]
        mean = 1000 * (b.seconds[name] - a.seconds[name]) / n if n else 0.0
        slow = n - (b.upto_half[name] - a.upto_half[name])
        parts.append(f"{name} {n:,.0f}, mean {mean:.0f} ms, over 0.5 s {slow:,.0f}")
    return "; ".join(parts)


# --- The reader ----------------------------------------------------------------------------


class Reader:
    def __init__(self, base: str, token: str, rate: float, rec: Recorder) -> None:
        self.base = base
        self.token = token
        self.rate = rate
        self.rec = rec
        self.rollout_id: int | None = None
        self.n = 0

    def next_path(self) -> str:
        self.n += 1
        region = REGIONS[self.n % len(REGIONS)]
        status = ("updating", "failed", "blocked", "in_sync", "pending")[self.n % 5]
        choice = self.n % 4
        if choice == 0:
            return f"/api/v1/vehicles?region={region}&limit=50"
        if choice == 1:
            return f"/api/v1/vehicles?status={status}&limit=50"
        if choice == 2 and self.rollout_id is not None:
            return f"/api/v1/rollouts/{self.rollout_id}"
        return "/api/v1/fleet/summary"

    async def run(self, until: float, clients: int = 4) -> None:
        interval = clients / self.rate
        started = time.perf_counter()

        async def client(offset: int) -> None:
            http = Http11(self.base, self.token)
            slot = 0
            try:
                while time.time() < until:
                    due = started + (slot + offset / clients) * interval
                    slot += 1
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif -delay > interval:  # far behind: skip, do not burst
                        continue
                    path = self.next_path()
                    at, t0 = time.time(), time.perf_counter()
                    try:
                        status, _, data = await http.get(path)
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        self.rec.add("reads", at, None, 0, type(exc).__name__)
                        await http.close()
                        continue
                    ms = (time.perf_counter() - t0) * 1000
                    self.rec.add(
                        "reads", at, ms, status, error_code(data) if status >= 400 else "-"
                    )
            finally:
                await http.close()

        await asyncio.gather(*(client(i) for i in range(clients)))


# --- The telemetry probe ---------------------------------------------------------------------


class Probe:
    """A light client of its own on the ingest process: `--probe-rate` POSTs a second of
    PROBE_BATCH heartbeats of vehicles of its own (region `soak-probe`: in no rollout, not
    simulated), over one keep-alive connection (`bench/http11.py`), timed from the soak's
    mostly idle process. What a device sees of the server, without the simulator's own
    event-loop delays."""

    def __init__(self, base: str, dev_key: str, rate: float, rec: Recorder) -> None:
        self.base = base
        self.token = mint_dev_token(dev_key, role=Role.GATEWAY, subject="soak-probe")
        self.rate = rate
        self.rec = rec
        self.ids = [f"{PROBE_PREFIX}{n:04d}" for n in range(PROBE_VEHICLES)]

    def register(self, api: str, dev_key: str) -> None:
        token = mint_dev_token(dev_key, role=Role.OPERATOR, subject="soak-operator")
        body = {
            "vehicles": [
                {"id": vid, "model": "atlas", "region": "soak-probe", "ring": "broad"}
                for vid in self.ids
            ]
        }
        r = httpx.post(
            f"{api}/api/v1/vehicles",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        if r.status_code not in (200, 201):
            raise SystemExit(f"registering the probe's vehicles: {r.status_code} {r.text[:300]}")

    async def run(self, until: float) -> None:
        http = Http11(self.base, self.token)
        started, slot, n = time.perf_counter(), 0, 0
        try:
            while time.time() < until:
                due = started + slot / self.rate
                slot += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                beats = []
                for _ in range(PROBE_BATCH):
                    beats.append(
                        {
                            "vehicleId": self.ids[n % len(self.ids)],
                            "sentAt": datetime.now(UTC).isoformat(),
                            "batteryPercent": 80,
                            "stationary": True,
                            "actualReleaseVersion": BASELINE_RELEASE,
                        }
                    )
                    n += 1
                payload = json.dumps({"heartbeats": beats, "events": []}).encode()
                at, t0 = time.time(), time.perf_counter()
                try:
                    status, _, data = await http.post("/api/v1/telemetry", payload)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.rec.add("probe", at, None, 0, type(exc).__name__)
                    await http.close()
                    continue
                ms = (time.perf_counter() - t0) * 1000
                self.rec.add("probe", at, ms, status, error_code(data) if status >= 400 else "-")
        finally:
            await http.close()


# --- The rollout driver --------------------------------------------------------------------


@dataclass
class Rollout:
    id: int
    region: str
    release: str
    created: float
    status: str = "pending"
    reason: str | None = None
    stage: str | None = None
    ended: float | None = None
    aborted_by_soak: bool = False
    seen: str = ""  # status, stage and progress counts last read
    progressed: float = 0.0  # when they last changed


class Driver:
    def __init__(
        self,
        base: str,
        dev_key: str,
        state_dir: Path,
        rec: Recorder,
        reader: Reader,
        args: argparse.Namespace,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base, timeout=60)
        token = mint_dev_token(dev_key, role=Role.OPERATOR, subject="soak-operator")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.key = load_or_create_signing_key(state_dir / SIGNING_KEY_FILE)
        self.rec = rec
        self.reader = reader
        self.args = args
        self.rollouts: list[Rollout] = []
        self.n = 0

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        at, t0 = time.time(), time.perf_counter()
        try:
            r = await self.http.request(method, path, headers=self.headers, **kwargs)
        except httpx.HTTPError as exc:
            self.rec.add("controls", at, None, 0, type(exc).__name__)
            return None
        ms = (time.perf_counter() - t0) * 1000
        code = error_code(r.content) if r.status_code >= 400 else "-"
        self.rec.add("controls", at, ms, r.status_code, code)
        if r.status_code >= 400:
            print(f"  [driver] {method} {path}: {r.status_code} {r.text[:300]}", flush=True)
        return r

    async def refresh(self) -> None:
        for ro in self.rollouts:
            if ro.status in TERMINAL:
                continue
            r = await self.call("GET", f"/api/v1/rollouts/{ro.id}")
            if r is None or r.status_code != 200:
                continue
            data = r.json()["data"]
            ro.status, ro.reason, ro.stage = data["status"], data["statusReason"], data["stage"]
            seen = json.dumps([ro.status, ro.stage, data["progress"]], sort_keys=True)
            if seen != ro.seen:
                ro.seen, ro.progressed = seen, time.time()
            if ro.status in TERMINAL:
                ro.ended = time.time()
                print(
                    f"  [driver] rollout {ro.id} ({ro.region}, {ro.release}) {ro.status}"
                    f" after {ro.ended - ro.created:.0f} s; progress {data['progress']}",
                    flush=True,
                )
            elif time.time() - ro.progressed > self.args.stuck_after:
                print(
                    f"  [driver] rollout {ro.id} {ro.status} ({ro.reason}, stage {ro.stage},"
                    f" waiting for {data.get('waitingFor')}): no progress for"
                    f" {self.args.stuck_after:.0f} s, aborting it",
                    flush=True,
                )
                ro.aborted_by_soak = True
                await self.call(
                    "POST", f"/api/v1/rollouts/{ro.id}/abort", json={"reason": "soak: stuck"}
                )

    async def release(self) -> str:
        self.n += 1
        version = f"2026.12.{self.n}"
        components = [
            {"name": "adas", "version": f"5.0.{self.n}"},
            {"name": "infotainment", "version": "12.1.0"},
        ]
        digest = "sha256:" + hashlib.sha256(f"soak:{version}".encode()).hexdigest()
        signature, kid = sign_release(self.key, version, digest, components)
        await self.call(
            "POST",
            "/api/v1/releases",
            json={
                "version": version,
                "components": components,
                "artifactDigest": digest,
                "signature": signature,
                "signingKeyId": kid,
                "notes": "bench/soak.py",
            },
        )
        return version

    async def create(self) -> None:
        held = {ro.region for ro in self.rollouts if ro.status not in TERMINAL}
        free = [r for r in REGIONS if r not in held]
        if not free:
            print("  [driver] every region held by an active rollout: waiting", flush=True)
            return
        region = free[self.n % len(free)]
        version = await self.release()
        body = {
            "name": f"soak {version} {region}",
            "releaseVersion": version,
            "targets": {"regions": [region]},
            "strategy": {
                "canary": {"size": CANARY, "bakeSeconds": 30},
                "waves": [{"percent": 100, "bakeSeconds": 30}],
            },
            "gates": {
                "canaryHealthy": {"minSuccessRate": 0.5},
                "failureThreshold": {"maxFailureRate": 0.5, "action": "pause"},
            },
            # A vehicle polls every --poll-seconds (+-20%) and applies for up to 30 s: the
            # timeout past both, so that only a vehicle gone offline times out.
            "timeouts": {"applySeconds": max(120, int(2 * self.args.poll_seconds + 60))},
            "retry": {"maxAttempts": 1},
        }
        r = await self.call("POST", "/api/v1/rollouts", json=body)
        if r is not None and r.status_code == 201:
            data = r.json()["data"]
            ro = Rollout(int(data["id"]), region, version, time.time(), data["status"])
            self.rollouts.append(ro)
            self.reader.rollout_id = ro.id
            print(f"  [driver] rollout {ro.id}: {version} to {region}", flush=True)

    async def run(self, until: float) -> None:
        next_create = time.time()
        while time.time() < until:
            await self.refresh()
            if time.time() >= next_create:
                await self.create()
                next_create += self.args.rollout_every
            await asyncio.sleep(5)
        await self.refresh()
        await self.http.aclose()


# --- The run -------------------------------------------------------------------------------


def _fmt_mib(value: int) -> str:
    return f"{value / 2**20:8.1f}"


def latency_line(values: list[float]) -> str:
    if not values:
        return "no answer"
    return (
        f"n {len(values):>7,}  p50 {percentile(values, 0.5):7.1f}  p99"
        f" {percentile(values, 0.99):7.1f}  max {max(values):8.1f} ms"
    )


def log_levels(path: Path) -> Counter[str]:
    """Lines of a role's JSON log by level (and the lines that are not JSON)."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        for line in f:
            try:
                counts[str(json.loads(line).get("level", "?"))] += 1
            except (ValueError, AttributeError):
                if line.strip():
                    counts["text"] += 1
    return counts


def answered(rec: Recorder, kind: str, lo: float, hi: float) -> list[float]:
    """Latencies (ms) of the successful answers of `kind` sent in [lo, hi)."""
    return [
        s.ms
        for s in rec.samples
        if s.kind == kind and s.ms is not None and s.status in (200, 202, 304) and lo <= s.at < hi
    ]


def report(
    rec: Recorder,
    memory: Memory,
    driver: Driver,
    stack: Stack,
    t0: float,
    warm: float,
    until: float,
    args: argparse.Namespace,
) -> list[str]:
    failures: list[str] = []
    print("\n== memory (RSS in MiB, each process summed over its process group)")
    end = memory.series[-1][0]
    start_mem, warm_mem, end_mem = memory.at(t0), memory.at(warm), memory.at(end)
    peak: dict[str, int] = defaultdict(int)
    for _, snap in memory.series:
        for name, value in snap.items():
            peak[name] = max(peak[name], value)
    print(f"  {'process':<12} {'start':>8} {'warm-up':>8} {'end':>8} {'peak':>8}  end / warm-up")
    for name in end_mem:
        ratio = end_mem[name] / warm_mem[name] - 1 if warm_mem.get(name) else float("inf")
        ok = ratio <= MEMORY_LIMIT
        judged = name != "soak"  # the measuring process keeps every sample: it grows
        if judged and not ok:
            failures.append(f"{name} memory {ratio:+.1%} over its warm-up level")
        verdict = ("ok" if ok else "OVER 10%") if judged else "(the soak's own samples: not judged)"
        print(
            f"  {name:<12} {_fmt_mib(start_mem[name])} {_fmt_mib(warm_mem[name])}"
            f" {_fmt_mib(end_mem[name])} {_fmt_mib(peak[name])}  {ratio:+6.1%}  {verdict}"
        )
    for label, when in (("start", t0), ("warm-up", warm), ("end", end)):
        count, anon = memory.backends_at(when)
        print(
            f"  PostgreSQL backends on the bench database at {label}: {count}, private"
            f" (RssAnon) {anon / 2**20:.1f} MiB (shown, not judged)"
        )
    print(f"  memory every {args.window:g} min (MiB):")
    names = list(end_mem)
    print("    " + f"{'minute':>6} " + " ".join(f"{n:>10}" for n in names))
    minute = 0.0
    while t0 + minute * 60 <= end + 1:
        snap = memory.at(t0 + minute * 60)
        print("    " + f"{minute:6g} " + " ".join(f"{snap[n] / 2**20:10.1f}" for n in names))
        minute += args.window

    print(f"  CPU every {args.window:g} min (% of one core, each window):")
    print("    " + f"{'minute':>6} " + " ".join(f"{n:>10}" for n in names))
    minute = 0.0
    while t0 + (minute + args.window) * 60 <= end + SAMPLE_SECONDS:
        lo = t0 + minute * 60
        share = memory.cpu_share(lo, lo + args.window * 60)
        print("    " + f"{minute:6g} " + " ".join(f"{share.get(n, 0):10.0f}" for n in names))
        minute += args.window
    share = memory.cpu_share(t0, end)
    print("    " + f"{'all':>6} " + " ".join(f"{share.get(n, 0):10.0f}" for n in names))
    print(
        f"  waiting for a CPU every {args.window:g} min (% of the time each process's main"
        " threads were runnable but not running: the machine's other load):"
    )
    print("    " + f"{'minute':>6} " + " ".join(f"{n:>10}" for n in names))
    minute = 0.0
    while t0 + (minute + args.window) * 60 <= end + SAMPLE_SECONDS:
        lo = t0 + minute * 60
        share = memory.cpu_share(lo, lo + args.window * 60, waiting=True)
        print("    " + f"{minute:6g} " + " ".join(f"{share.get(n, 0):10.0f}" for n in names))
        minute += args.window
    share = memory.cpu_share(t0, end, waiting=True)
    print("    " + f"{'all':>6} " + " ".join(f"{share.get(n, 0):10.0f}" for n in names))

    print(f"\n== latency (ms), per {args.window:g}-minute window from the start of the load")
    step = args.window * 60
    windows = max(1, math.ceil((until - t0) / step - 1e-9))
    lines = (
        ("reads", READ_P99_MS, ""),
        ("probe", TELEMETRY_P99_MS, ": POST /telemetry 202s of the soak's own light client"),
        ("telemetry", None, ": the simulator's POST /telemetry 202s, at its client"),
        ("polls", None, ": the simulator's desired-state polls, at its client"),
    )
    for kind, goal, what in lines:
        rule = f"goal p99 < {goal:g} ms in every window" if goal else "not judged"
        print(f"  {kind}{what} ({rule})")
        for w in range(windows):
            lo = t0 + w * step
            hi = until + 60 if w == windows - 1 else lo + step  # the last takes the stragglers
            values = answered(rec, kind, lo, hi)
            mark = ""
            if goal is not None and not values:
                failures.append(f"no {kind} answered in minutes {w * args.window:g}+")
            if goal is not None and values:
                p99 = percentile(values, 0.99)
                mark = "  ok" if p99 < goal else "  OVER"
                span = f"{w * args.window:g}-{(w + 1) * args.window:g}"
                if p99 >= goal:
                    failures.append(f"{kind} p99 {p99:.0f} ms in minutes {span}")
            label = f"min {w * args.window:>3g}-{(w + 1) * args.window:<3g}"
            print(f"    {label} {latency_line(values)}{mark}")
        print(f"    whole run  {latency_line(answered(rec, kind, t0, until + 60))}")
    accepted = [s for s in rec.samples if s.kind == "telemetry" and s.status == 202]
    print(f"  telemetry 202s: {len(accepted) / max(1.0, until - t0):.1f} POSTs/s")

    print("\n== answers by status and error code")
    for kind in ("reads", "probe", "telemetry", "polls", "fleet-list", "controls"):
        counts = Counter((s.status, s.code) for s in rec.samples if s.kind == kind)
        if not counts:
            continue
        shown = ", ".join(
            f"{status or 'no answer'}{'' if code == '-' else ' ' + code}: {n:,}"
            for (status, code), n in sorted(counts.items())
        )
        print(f"  {kind:<10} {shown}")
        fives = sum(n for (status, _), n in counts.items() if status >= 500)
        if fives:
            failures.append(f"{fives} 5xx answers to {kind}")
    print("\n== rollouts")
    by_status = Counter(ro.status for ro in driver.rollouts)
    print(
        f"  {len(driver.rollouts)} created: " + ", ".join(f"{k} {v}" for k, v in by_status.items())
    )
    for ro in driver.rollouts:
        took = f"{ro.ended - ro.created:.0f} s" if ro.ended else "not finished"
        print(
            f"  {ro.id:>3} {ro.release:<12} {ro.region:<9} {ro.status:<10} {ro.reason or '-':<20}"
            f" {took}{' (aborted by the soak: stuck)' if ro.aborted_by_soak else ''}"
        )
    stuck = [ro for ro in driver.rollouts if ro.aborted_by_soak]
    if stuck:
        failures.append(
            f"{len(stuck)} rollouts stuck (no progress for {args.stuck_after:.0f} s: aborted)"
        )
    print("\n== log lines by level (each role's log in " + str(stack.logs) + ")")
    for name in stack.procs:
        levels = log_levels(stack.logs / f"{name}.log")
        print(f"  {name:<10} " + (", ".join(f"{k} {v}" for k, v in levels.most_common()) or "none"))
    return failures


async def drive(
    api: str,
    ingest: str,
    dev_key: str,
    metrics_token: str,
    state_dir: Path,
    memory: Memory,
    stack: Stack,
    args: argparse.Namespace,
) -> int:
    rec = Recorder()
    total = args.minutes * 60
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    probe = Probe(ingest, dev_key, args.probe_rate, rec)
    probe.register(api, dev_key)
    children = []
    for index in range(args.simulators):
        plan = SimPlan(
            ingest=ingest,
            api=api,
            dev_key=dev_key,
            seconds=total + 5,
            index=index,
            count=args.simulators,
            poll_seconds=args.poll_seconds,
            heartbeat_seconds=args.heartbeat_seconds,
            log=str(state_dir / f"simulator-{index}.log"),
        )
        child = ctx.Process(target=simulator_child, args=(plan, out, stop), daemon=True)
        child.start()
        children.append(child)
    memory.single["simulator"] = [c.pid for c in children if c.pid is not None]
    memory.single["soak"] = [os.getpid()]

    def drain() -> None:
        while True:
            try:
                batch = out.get_nowait()
            except queue.Empty:
                return
            for kind, at, ms, status, code in batch:
                rec.add(kind, at, ms, status, code)

    t0 = time.time()
    until = t0 + total
    warm = t0 + args.warmup * 60
    memory.sample()
    views: list[IngestView] = []

    def scrape() -> None:
        view = scrape_ingest(ingest, metrics_token)
        if view is not None:
            views.append(view)

    scrape()
    viewer = mint_dev_token(dev_key, role=Role.VIEWER, subject="soak-reader")
    reader = Reader(api, viewer, args.read_rate, rec)
    driver = Driver(api, dev_key, state_dir, rec, reader, args)

    async def sampler() -> None:
        step = args.window * 60
        next_window = t0 + step
        while time.time() < until:
            await asyncio.sleep(SAMPLE_SECONDS)
            await asyncio.to_thread(memory.sample)
            drain()
            stack.check()
            if not all(child.is_alive() for child in children):
                raise SystemExit(f"a simulator exited: see {state_dir}/simulator-*.log")
            now = time.time()
            if now >= next_window:
                await asyncio.to_thread(scrape)
                minute = (next_window - t0) / 60
                window = [s for s in rec.samples if next_window - step <= s.at < next_window]
                reads = answered(rec, "reads", next_window - step, next_window)
                tele = answered(rec, "telemetry", next_window - step, next_window)
                probe_ms = answered(rec, "probe", next_window - step, next_window)
                fives = sum(1 for s in window if s.status >= 500)
                mem = " ".join(f"{k} {v / 2**20:.0f}" for k, v in memory.series[-1][1].items())
                cpu = " ".join(
                    f"{k} {v:.0f}" for k, v in memory.cpu_share(next_window - step, now).items()
                )
                waited = memory.cpu_share(next_window - step, now, waiting=True)
                cpu += f" (ingest waited for a CPU {waited.get('ingest', 0):.0f}% of the time)"
                print(
                    f"  [{minute:4g} min] reads p99 {percentile(reads, 0.99) if reads else 0:.1f}"
                    f" ms, probe p99 {percentile(probe_ms, 0.99) if probe_ms else 0:.1f} ms,"
                    f" simulator's telemetry p99 {percentile(tele, 0.99) if tele else 0:.1f} ms"
                    f" ({len(tele)} POSTs), 5xx {fives}; RSS MiB: {mem}; CPU %: {cpu};"
                    f" load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if len(views) >= 2:
                    print(
                        f"           ingest (server side): {ingest_delta(views[-2], views[-1])}",
                        flush=True,
                    )
                next_window += step

    try:
        await asyncio.gather(reader.run(until), driver.run(until), probe.run(until), sampler())
    finally:
        stop.set()
        deadline = time.monotonic() + 60
        # Drained while they stop: a child that put samples on the queue exits only once
        # they are read.
        while any(c.is_alive() for c in children) and time.monotonic() < deadline:
            drain()
            await asyncio.sleep(0.2)
        for child in children:
            if child.is_alive():
                child.terminate()
        drain()
    scrape()
    failures = report(rec, memory, driver, stack, t0, warm, until, args)
    if len(views) >= 2:
        whole = ingest_delta(views[0], views[-1])
        print(f"\n== the ingest process's /metrics over the run: {whole}")
    print(
        "\nno baseline ratio (a long run is compared with itself): memory end / warm-up, and"
        " each window's p99 against the goal"
    )
    if failures:
        print("\ngoals of issue 20: NOT met:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(
        "\ngoals of issue 20: met (memory within 10% of warm-up, no 5xx, read p99 < 100 ms and"
        " telemetry 202 p99 < 500 ms in every window)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30, help="length of the load")
    parser.add_argument(
        "--warmup",
        type=float,
        default=15,
        help="minutes before the memory reference (once every region holds a rollout)",
    )
    parser.add_argument("--window", type=float, default=5, help="minutes per latency window")
    parser.add_argument("--vehicles", type=int, default=20_000)
    parser.add_argument("--rollout-every", type=float, default=180, help="seconds between rollouts")
    parser.add_argument(
        "--stuck-after",
        type=float,
        default=900,
        help="seconds without a change of a rollout's status, stage or counts: stuck",
    )
    parser.add_argument("--read-rate", type=float, default=20, help="reads per second")
    parser.add_argument("--ingest-processes", type=int, default=1)
    parser.add_argument(
        "--simulators", type=int, default=2, help="simulator processes sharing the fleet"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=120, help="each vehicle's desired-state poll"
    )
    parser.add_argument("--heartbeat-seconds", type=float, default=60, help="each vehicle's")
    parser.add_argument(
        "--probe-rate", type=float, default=2, help="the telemetry probe's POSTs per second"
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args(argv)
    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    state_dir = localservers.STATE_DIR / "bench-soak"  # logs of the last run
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    build = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=localservers.PROJECT_ROOT,
    ).stdout.strip()
    name = f"motorcade_bench_soak_{secrets.token_hex(4)}"
    url = localservers.ensure_database(server, name)
    stack: Stack | None = None
    try:
        upgrade(url)
        print(
            f"== soak: build {build}, database {name}, {args.vehicles:,} vehicles,"
            f" {args.minutes:g} min (warm-up {args.warmup:g}), a rollout every"
            f" {args.rollout_every:g} s, reads {args.read_rate:g}/s; load average"
            f" {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        seeded = seed_fleet(url, vehicles=args.vehicles, state_dir=state_dir)
        print(f"  seeded {args.vehicles:,} vehicles in {seeded.seconds:.1f} s", flush=True)
        dev_key = generate_dev_key()
        metrics_token = secrets.token_hex(16)
        stack, api, ingest = start_stack(url, dev_key, metrics_token, state_dir, args)
        print(f"  stack up: API {api}, ingest {ingest}, logs in {state_dir}", flush=True)
        memory = Memory({n: p.pid for n, p in stack.procs.items()}, {}, name, server)
        code = asyncio.run(
            drive(api, ingest, dev_key, metrics_token, state_dir, memory, stack, args)
        )
        print(f"  load average at the end {os.getloadavg()[0]:.1f}")
        return code
    finally:
        if stack is not None:
            stack.stop()
        if not args.keep:
            localservers.drop_database(server, name)


if __name__ == "__main__":
    sys.exit(main())
