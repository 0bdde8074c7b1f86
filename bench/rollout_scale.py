"""Rollout at fleet scale: the real `RolloutWorkflow` and worker over N seeded vehicles.

    .venv/bin/python bench/rollout_scale.py [--vehicles 100000 [--vehicles 1000000 ...]]

For each N: a fresh, migrated database (on the server at MOTORCADE_DATABASE_URL, else an
embedded one under .motorcade/bench-pgdata running with `devtools.localservers.
FLEET_SCALE_SETTINGS`: the settings recommended for a million vehicles; the first line printed
names the server's version and settings), `seed_fleet` with N vehicles, one rollout of the
newest sample release over all of them (canary 1%, waves 10/50/100%, every bake 0 s), run by
the real worker (`worker.main.build_worker`) on the time-skipping test server. Outcomes are
simulated and instant: when a stage's `issue_stage` activity returns, every vehicle it notified
reports success through `services.rollouts.outcomes.record_target_outcomes` (the telemetry
path's function), timed apart from the activity.

Prints, per N: planning seconds (the `expand_targets` activity), issuing seconds and desired
states written per second (`issue_stage`), all activity seconds, history events per run and the
number of runs (the continue-as-new chain), wall time; and a ceiling measured in the same
database: the same writes as issuing, as two set-based statements over all N vehicles and
targets (rolled back), with the ratio. Goal (issue 3): 1,000,000 vehicles planned and every desired
state written in under 60 s of activity time; no run over 10,240 history events.

`--reconcile` also times the reconcile's statements over the same fleet (services/reconcile.py):
recording drift, then marking every vehicle offline (the worst case) batch by batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
)
from temporalio.worker import (
    Interceptor as WorkerInterceptor,
)

from core.db import create_engine, session_factory, session_scope
from core.temporal import (
    ROLLOUT_WORKFLOW_TYPE,
    ensure_search_attributes,
    initial_search_attributes,
    rollout_workflow_id,
)
from devtools import localservers
from devtools.seed import SAMPLE_RELEASES, seed_fleet
from models.workflows import RolloutInput
from services import reconcile as reconcile_svc
from services.rollouts import issue, outcomes
from worker.main import build_worker

RELEASE = SAMPLE_RELEASES[-1].version
# The seeded fleet's heartbeats pass the default safety checks but nobody sends new ones, and
# a million-vehicle run lasts longer than MOTORCADE_OFFLINE_AFTER_SECONDS: the worker trusts
# them for a day, so every vehicle is judged (the same statements) and passes (docs/safety.md).
HEARTBEAT_TRUST = 86_400
STRATEGY = {
    "canary": {"size": None, "percent": 1, "bakeSeconds": 0},
    "waves": [
        {"percent": 10, "bakeSeconds": 0},
        {"percent": 50, "bakeSeconds": 0},
        {"percent": 100, "bakeSeconds": 0},
    ],
}
HISTORY_WARNING = 10_240
GOAL_SECONDS = 60.0
OUTCOME_CHUNK = 50_000


# --- Timing every activity, and simulating outcomes after each stage ------------------------


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    simulated_seconds: float = 0.0
    simulated_outcomes: int = 0


class Bench(ClientInterceptor, WorkerInterceptor):
    """A client interceptor that is also a worker interceptor: a worker built from a client
    carrying it (`build_worker`, unchanged) times each activity by type, and after each
    `issue_stage` makes the stage's notified vehicles report success."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, simulate: bool) -> None:
        self.sessions = sessions
        self.simulate = simulate
        self.timings = Timings()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TimedActivity(next, self)


class _TimedActivity(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, bench: Bench) -> None:
        super().__init__(next)
        self._bench = bench

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        name = activity.info().activity_type
        started = time.perf_counter()
        try:
            return_value = await super().execute_activity(input)
        finally:
            self._bench.timings.seconds[name] += time.perf_counter() - started
            self._bench.timings.calls[name] += 1
        if name == "issue_stage" and self._bench.simulate:
            await _simulate_outcomes(self._bench, input.args[0])
        return return_value


async def _simulate_outcomes(bench: Bench, issue_input: Any) -> None:
    """Every vehicle of the stage that was notified reports `ready` at once (succeeded)."""
    rollout_id = issue_input.rollout_id
    stage_index = issue_input.stage_index
    started = time.perf_counter()
    after = ""
    while True:
        async with session_scope(bench.sessions) as session:
            conn = await session.connection()
            ids = list(
                (
                    await conn.execute(
                        text(
                            "SELECT vehicle_id FROM rollout_targets WHERE rollout_id = :rid"
                            " AND stage = :stage AND state = 'notified' AND vehicle_id > :after"
                            " ORDER BY vehicle_id LIMIT :n"
                        ),
                        {
                            "rid": rollout_id,
                            "stage": stage_index,
                            "after": after,
                            "n": OUTCOME_CHUNK,
                        },
                    )
                ).scalars()
            )
            if not ids:
                break
            moved = await outcomes.record_target_outcomes(
                session,
                rollout_id=rollout_id,
                outcomes=[(vid, "succeeded", None) for vid in ids],
            )
            # What the vehicles' telemetry would do: running the desired release now.
            await conn.execute(
                text(
                    "UPDATE vehicles SET actual_release_version = desired_release_version,"
                    " status = 'in_sync', updated_at = now() WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            )
        bench.timings.simulated_outcomes += int(moved)
        after = ids[-1]
    bench.timings.simulated_seconds += time.perf_counter() - started


# --- One measurement ----------------------------------------------------------------------


@dataclass
class Figures:
    vehicles: int
    seed_seconds: float
    status: str
    targeted: int
    notified: int
    succeeded: int
    timings: Timings
    runs: list[int]
    wall_seconds: float
    ceiling_vehicles_seconds: float
    ceiling_all_seconds: float
    reconcile: dict[str, float] = field(default_factory=dict)


def _insert_rollout(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "INSERT INTO rollouts (name, release_version, targets, strategy, status, created_by,"
            " correlation_id) VALUES ('bench', %s, '{}', %s, 'pending', 'bench', 'bench')"
            " RETURNING id",
            (RELEASE, json.dumps(STRATEGY)),
        ).fetchone()
        assert row is not None
        rollout_id = int(row[0])
        conn.execute(
            "UPDATE rollouts SET workflow_id = %s WHERE id = %s",
            (rollout_workflow_id(rollout_id), rollout_id),
        )
    return rollout_id


def _ceiling(url: str, rollout_id: int) -> tuple[float, float]:
    """The same writes as issuing every stage, set-based over all N vehicles in one transaction
    (rolled back): (the vehicles UPDATE alone, the vehicles and the targets UPDATEs)."""
    ds_id = str(issue.target_set_desired_state_id(rollout_id, "ceiling"))
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(
            "UPDATE vehicles SET desired_release_version = %s, desired_state_id = %s,"
            " rollout_id = %s, status = 'pending', updated_at = now()",
            (RELEASE, ds_id, rollout_id),
        )
        vehicles_only = time.perf_counter() - started
        conn.execute(
            "UPDATE rollout_targets SET state = 'notified', attempt = attempt + 1,"
            " desired_state_id = %s, notified_at = now(), updated_at = now()"
            " WHERE rollout_id = %s",
            (ds_id, rollout_id),
        )
        everything = time.perf_counter() - started
        conn.rollback()
    return vehicles_only, everything


async def _history(client: Client, workflow_id: str, first_run_id: str | None) -> list[int]:
    """Events per run, following the continue-as-new chain from the first run."""
    counts: list[int] = []
    run_id = first_run_id
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        counts.append(len(history.events))
        last = history.events[-1] if history.events else None
        run_id = None
        if last is not None and last.HasField(
            "workflow_execution_continued_as_new_event_attributes"
        ):
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return counts


async def _reconcile(url: str) -> dict[str, float]:
    """The reconcile's statements over the whole fleet: recording drift (a scan and a GROUP
    BY), then the worst case of offline marking: every vehicle stale (cutoff tomorrow), batch by
    batch, one transaction each, as the activity does."""
    engine = create_engine(url=url)
    sessions = session_factory(engine)
    figures: dict[str, float] = {}
    try:
        started = time.perf_counter()
        async with session_scope(sessions) as session:
            run = await reconcile_svc.record_drift(session, run_key=f"bench-{secrets.token_hex(4)}")
        figures["record_drift_seconds"] = time.perf_counter() - started
        figures["drifted"] = run.drifted
        cutoff = datetime.now(UTC) + timedelta(days=1)
        after_key, after_id, marked, batches = None, None, 0, 0
        started = time.perf_counter()
        while True:
            async with session_scope(sessions) as session:
                batch = await reconcile_svc.mark_offline_batch(
                    session, cutoff=cutoff, after_key=after_key, after_id=after_id
                )
            marked, batches = marked + batch.marked, batches + 1
            if batch.scanned < reconcile_svc.OFFLINE_BATCH_SIZE:
                break
            after_key, after_id = batch.last_key, batch.last_id
        figures["mark_offline_all_seconds"] = time.perf_counter() - started
        figures["marked_offline"] = marked
        figures["offline_batches"] = batches
        started = time.perf_counter()
        async with session_scope(sessions) as session:
            again = await reconcile_svc.mark_offline(session, cutoff=cutoff)
        figures["mark_offline_again_seconds"] = time.perf_counter() - started
        figures["marked_again"] = again
    finally:
        await engine.dispose()
    return figures


async def measure(
    url: str, vehicles: int, *, simulate: bool, limit_seconds: float, reconcile: bool = False
) -> Figures:
    with tempfile.TemporaryDirectory(prefix="motorcade-bench-") as state_dir:
        seeded = seed_fleet(url, vehicles=vehicles, state_dir=Path(state_dir))
    print(f"  seeded {vehicles:,} vehicles in {seeded.seconds:.1f} s", flush=True)
    rollout_id = _insert_rollout(url)
    engine = create_engine(url=url)
    sessions = session_factory(engine)
    bench = Bench(sessions, simulate=simulate)
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=localservers.venv_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    try:
        await ensure_search_attributes(env.client)
        config = env.client.config()
        config["interceptors"] = [bench]
        client = Client(**config)
        task_queue = f"bench-{secrets.token_hex(4)}"
        workflow_id = rollout_workflow_id(rollout_id)
        started = time.perf_counter()
        async with build_worker(
            client, sessions, task_queue=task_queue, offline_after_seconds=HEARTBEAT_TRUST
        ):
            handle = await client.start_workflow(
                ROLLOUT_WORKFLOW_TYPE,
                RolloutInput(rollout_id=rollout_id, release_version=RELEASE),
                id=workflow_id,
                task_queue=task_queue,
                search_attributes=initial_search_attributes(
                    rollout_id=rollout_id, release_version=RELEASE, status="pending"
                ),
            )
            try:
                async with asyncio.timeout(limit_seconds):
                    await handle.result()
            except TimeoutError:
                print(f"  the workflow did not finish within {limit_seconds:.0f} s", flush=True)
        wall = time.perf_counter() - started
        runs = await _history(
            client, workflow_id, handle.first_execution_run_id or handle.result_run_id
        )
    finally:
        await env.shutdown()
        await engine.dispose()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status, targeted, notified, succeeded FROM rollouts WHERE id = %s",
            (rollout_id,),
        ).fetchone()
    assert row is not None
    vehicles_only, everything = _ceiling(url, rollout_id)
    reconcile_figures = await _reconcile(url) if reconcile else {}
    return Figures(
        vehicles=vehicles,
        seed_seconds=seeded.seconds,
        status=str(row[0]),
        targeted=int(row[1]),
        notified=int(row[2]),
        succeeded=int(row[3]),
        timings=bench.timings,
        runs=runs,
        wall_seconds=wall,
        ceiling_vehicles_seconds=vehicles_only,
        ceiling_all_seconds=everything,
        reconcile=reconcile_figures,
    )


def report(f: Figures) -> None:
    t = f.timings
    planning = t.seconds.get("expand_targets", 0.0)
    issuing = t.seconds.get("issue_stage", 0.0)
    activity_total = sum(t.seconds.values())
    rate = f.notified / issuing if issuing else 0.0
    ceiling_rate = f.vehicles / f.ceiling_all_seconds if f.ceiling_all_seconds else 0.0
    print(f"\nRollout over {f.vehicles:,} vehicles: {f.status}")
    print(f"  targeted {f.targeted:,}, notified {f.notified:,}, succeeded {f.succeeded:,}")
    print(f"  planning (expand_targets)            {planning:9.2f} s")
    print(
        f"  issuing (issue_stage, {t.calls.get('issue_stage', 0)} stages)      {issuing:9.2f} s"
        f"   {rate:,.0f} desired states/s"
    )
    print(
        f"  planning + issuing                   {planning + issuing:9.2f} s"
        f"   goal < {GOAL_SECONDS:.0f} s at 1,000,000"
    )
    print(f"  all activities                       {activity_total:9.2f} s")
    for name in sorted(t.seconds):
        print(f"    {name:<32} {t.calls[name]:>4} calls {t.seconds[name]:9.2f} s")
    print(
        f"  simulated outcomes (not activity)    {t.simulated_seconds:9.2f} s"
        f"   {t.simulated_outcomes:,} vehicles"
    )
    print(
        f"  runs {len(f.runs)}, history events per run {f.runs}"
        f" (max {max(f.runs, default=0):,}; warning at {HISTORY_WARNING:,})"
    )
    print(f"  wall time (workflow start to result) {f.wall_seconds:9.2f} s")
    print(
        f"  ceiling, same database: one UPDATE of every vehicle"
        f" {f.ceiling_vehicles_seconds:.2f} s; with one UPDATE of every target"
        f" {f.ceiling_all_seconds:.2f} s ({ceiling_rate:,.0f}/s)"
    )
    if f.ceiling_all_seconds:
        print(f"  issuing / ceiling: {issuing / f.ceiling_all_seconds:.1f}x")
    r = f.reconcile
    if r:
        print(
            f"  reconcile: record_drift {r['record_drift_seconds']:.2f} s"
            f" ({int(r['drifted']):,} drifted); every vehicle marked offline"
            f" {r['mark_offline_all_seconds']:.2f} s ({int(r['marked_offline']):,} in"
            f" {int(r['offline_batches'])} batches); a second pass"
            f" {r['mark_offline_again_seconds']:.2f} s ({int(r['marked_again'])} marked)"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vehicles", type=int, action="append")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per rollout, seconds")
    parser.add_argument(
        "--no-outcomes", action="store_true", help="do not simulate the vehicles' success"
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench databases")
    parser.add_argument(
        "--reconcile",
        action="store_true",
        help="also time the reconcile over the fleet (drift, then every vehicle offline)",
    )
    args = parser.parse_args(argv)
    sizes = args.vehicles or [100_000]

    server = localservers.bench_server_url()
    print(localservers.describe_server(server), flush=True)
    for vehicles in sizes:
        with localservers.bench_database(server, keep=args.keep) as (name, url):
            print(f"\n== {vehicles:,} vehicles (database {name})", flush=True)
            figures = asyncio.run(
                measure(
                    url,
                    vehicles,
                    simulate=not args.no_outcomes,
                    limit_seconds=args.timeout,
                    reconcile=args.reconcile,
                )
            )
            report(figures)


if __name__ == "__main__":
    main()
