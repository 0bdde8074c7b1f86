"""Schemathesis (PyPI) against the app's own OpenAPI document, as each role.

The real app (uvicorn on a loopback port, over a PostgreSQL database of its own and a Temporal
namespace of its own, rate limits off) is driven by schemathesis's engine, the one its CLI
runs: every phase (examples, coverage, fuzzing, stateful), every check, once per role
(operator, viewer, device of a registered vehicle, gateway). Seeded rows (vehicles, a signed
release, a rollout, telemetry) give reads real rows and the stateful phase real links.

Each role's run must end with 0 failures and at least its floor of generated cases
(`FLOORS`, at least 2,000 in all): a run that silently shrinks fails as surely as one that
finds a bug. On failure the message lists each one with its check, the response and a curl
command that reproduces it (its Authorization header filtered: any token of that role), and
the command that re-runs that role.

Run alone: `make test PYTEST_ARGS='-s tests/api/test_schemathesis.py'` (docs/development.md);
`MOTORCADE_SCHEMATHESIS_EXAMPLES` raises the examples per operation, `..._SEED` changes the
seed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.duration_pb2 import Duration
from schemathesis.engine import events, from_schema
from schemathesis.engine.statistic import Statistic
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.db import create_engine, session_factory
from core.settings import Settings
from core.temporal import ensure_search_attributes
from tests.api.conftest import METRICS_TOKEN, bearer, serve_app
from tests.api.telemetry import event, heartbeat
from tests.conftest import migrated_database
from tests.factories import insert_signed_release
from worker.main import build_worker

LISTS = (
    "^/api/v1/(vehicles|releases|rollouts|desired-states|audit-log)$"
    "|^/api/v1/vehicles/[^/]+/(timeline|events)$|^/api/v1/rollouts/[^/]+/vehicles$"
)
KEYED = "^/api/v1/(vehicles|releases|rollouts|desired-states)$|^/api/v1/rollouts/[^/]+/[a-z]+$"
# Generated cases each role's run must reach (the sum is the floor of 2,000).
# A run makes about 2,390, 1,255, 636 and 627 (MAX_EXAMPLES 10, seed 19).
FLOORS = {"operator": 1500, "viewer": 700, "device": 300, "gateway": 300}
assert sum(FLOORS.values()) >= 2000
MAX_EXAMPLES = int(os.environ.get("MOTORCADE_SCHEMATHESIS_EXAMPLES", "10"))
SEED = int(os.environ.get("MOTORCADE_SCHEMATHESIS_SEED", "19"))
NAMESPACE = "schemathesis"
DEVICE_VEHICLE = "ST-DEVICE-1"
RELEASE = "2026.12.0-st"


# What each role may call (tests/api/test_role_matrix.py): (method, path regex). Every
# operation runs every phase as every role, except that the coverage phase (the boundary and
# invalid values of every field) skips the operations the role is refused outright: there
# each of those cases would be the same 403, and the examples and fuzzing phases already
# check that answer. Coverage of every operation is that of the roles that may call it.
PROBES = [("GET", "^/(healthz|readyz)$")]
READS = [
    ("GET", "^/(metrics|api/v1/(?!vehicles/[^/]+/desired-state$).*)$"),
    ("POST", "^/api/v1/stream/tickets$"),
]
TELEMETRY = [("POST", "^/api/v1/telemetry$")]
MAY_CALL = {
    "operator": [*PROBES, *READS, ("POST", "^/api/v1/(?!telemetry$).*$")],
    "viewer": [*PROBES, *READS],
    "device": [*PROBES, *TELEMETRY, ("GET", "^/api/v1/vehicles/[^/]+/desired-state$")],
    "gateway": [*PROBES, *TELEMETRY],
}


def refused(role: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """The (method, path) of the document's operations `role` may not call."""
    allowed = MAY_CALL[role]
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if not any(method.upper() == m and re.match(pattern, path) for m, pattern in allowed)
    ]


# Inputs the schema cannot judge, which the app refuses with 422 and the error envelope
# naming the field (SPEC.md): for these operations the positive_data_acceptance check
# (ST202) also accepts 422 (any other status it rejects as before; every other check stays).
RULES_BEYOND_THE_SCHEMA = [
    (LISTS, "`cursor` is opaque: only a nextCursor this list issued is a cursor"),
    ("^/api/v1/(vehicles|releases|rollouts)$", "`sort` names a field of that list"),
    ("^/api/v1/releases$", "`signature` must verify with a trusted key"),
    ("^/api/v1/(rollouts|desired-states)$", "targets select something; canary has size or percent"),
    ("^/api/v1/rollouts/[^/]+/(pause|rollback|abort)$", "`force` goes with resume only"),
    (KEYED, "an Idempotency-Key reused with another body is IDEMPOTENCY_KEY_MISMATCH"),
    ("^/api/v1/audit-log(/export)?$", "`from` before `to`"),
    ("^/api/v1/telemetry$", "a failed or blocked event needs a reasonCode"),
    ("^/api/v1/telemetry$", "strict integers: `seq: 1.0` is refused (JSON Schema calls it one)"),
    # A stateful link from a vehicle whose `desired.rolloutId` is null (not in a rollout)
    # fills the path with "None": schemathesis treats a linked value as valid.
    ("^/api/v1/rollouts/[^/]+$", "a rolloutId a response gave as null"),
]
# schemathesis's defaults plus 422 (accepted) and 413 (rejected); a 5xx stays in both, as in
# the defaults, because `not_a_server_error` (ST101) is the check that reports it.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
REJECTED = [
    *("400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"),
    "5xx",
]


@dataclass
class Seeded:
    url: str
    tokens: dict[str, str]
    vehicles: list[str] = field(default_factory=list)
    rollout_id: int | None = None


@pytest.fixture(scope="module")
def own_database_url(database_server_url: str) -> Iterator[str]:
    """Fuzzed writes land in a database of their own, never in the suite's shared one."""
    with migrated_database(database_server_url) as url:
        yield url


async def fuzz_namespace(env: WorkflowEnvironment) -> str:
    """A Temporal namespace of the run's own: the workflows of the rollouts it creates run
    there, on its own worker over its own database, never on the suite's workers."""
    service = env.client.workflow_service
    try:
        await service.register_namespace(
            RegisterNamespaceRequest(
                namespace=NAMESPACE, workflow_execution_retention_period=Duration(seconds=86400)
            )
        )
    except RPCError as err:
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise
    for _ in range(100):  # a new namespace takes a moment to be served
        try:
            await ensure_search_attributes(env.client, NAMESPACE)
            return NAMESPACE
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"namespace {NAMESPACE} never became available")


@pytest.fixture(scope="module")
async def seeded(
    api_settings: Settings,
    own_database_url: str,
    dev_server_env: WorkflowEnvironment,
    signing_key: Ed25519PrivateKey,
    token: Callable[..., str],
) -> AsyncIterator[Seeded]:
    settings = api_settings.model_copy(
        update={
            "database_url": own_database_url,
            "temporal_namespace": await fuzz_namespace(dev_server_env),
            # Off for the run: thousands of writes by one subject are the point (the
            # telemetry limits are off in api_settings already).
            "rate_limit_writes_per_minute": 0,
        }
    )
    tokens = {
        "operator": token("operator"),
        "viewer": token("viewer"),
        "device": token("device", vehicle_id=DEVICE_VEHICLE),
        "gateway": token("gateway"),
    }
    client = Client(
        dev_server_env.client.service_client,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    engine = create_engine(settings)
    try:
        # The rollout worker of that namespace: control requests (a workflow Update) get
        # their answer, and the seeded rollout runs as it would in production.
        async with (
            build_worker(client, session_factory(engine)),
            serve_app(create_app(settings)) as url,
        ):
            seeded = Seeded(url=url, tokens=tokens)
            await seed(seeded, own_database_url, signing_key)
            yield seeded
    finally:
        await engine.dispose()


async def seed(seeded: Seeded, database_url: str, signing_key: Ed25519PrivateKey) -> None:
    """Registered vehicles, a signed release, a rollout over them, telemetry (their timeline),
    all through the API as a client would, except the release (signed by the test's key)."""
    operator = bearer(seeded.tokens["operator"])
    ids = [DEVICE_VEHICLE, *(f"ST-{i}" for i in range(6))]
    seeded.vehicles = ids
    insert_signed_release(database_url, signing_key, RELEASE)
    async with httpx.AsyncClient(base_url=seeded.url, timeout=30) as http:
        vehicles = [
            {"id": vid, "model": "atlas", "region": "eu-west", "ring": "broad"} for vid in ids
        ]
        r = await http.post("/api/v1/vehicles", headers=operator, json={"vehicles": vehicles})
        assert r.status_code == 201, r.text
        telemetry = {
            "heartbeats": [heartbeat(vid) for vid in ids],
            "events": [event(vid, 1, "apply_start", release=RELEASE) for vid in ids],
        }
        r = await http.post(
            "/api/v1/telemetry", headers=bearer(seeded.tokens["gateway"]), json=telemetry
        )
        assert r.status_code == 202, r.text
        r = await http.post(
            "/api/v1/rollouts",
            headers={**operator, "Idempotency-Key": str(uuid.uuid4())},
            json={
                "name": "schemathesis rollout",
                "releaseVersion": RELEASE,
                "targets": {"vehicleIds": ids},
                "strategy": {
                    "canary": {"size": 1, "bakeSeconds": 600},
                    "waves": [{"percent": 100, "bakeSeconds": 0}],
                },
            },
        )
        assert r.status_code == 201, r.text
        seeded.rollout_id = r.json()["data"]["id"]


def config_for(seeded: Seeded, role: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Every phase and every check, deterministic, authenticated as `role` (the dict form of
    a `schemathesis.toml`)."""
    config: dict[str, Any] = {
        "seed": SEED,
        "base-url": seeded.url,
        "headers": {"Authorization": f"Bearer {seeded.tokens[role]}"},
        "workers": 1,
        "request-timeout": 10,
        # No shrinking: a failure is reported as found (with its curl), not replayed for
        # minutes in search of a smaller one; the run's time stays bounded either way.
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "no-shrink": True},
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            # Positive data only in sequences: a type-mutated query value (`ring=533`, the
            # integer) is sent as the same text a valid string would be, so ST201 would
            # blame the app for accepting a valid string. Negative data is the coverage
            # and fuzzing phases' work, where schemathesis tells the two apart.
            # Its text is text PostgreSQL can store (no U+0000, no lone surrogate: `codec`
            # utf-8): the app refuses the rest with 422 naming the field, which the other
            # phases' cases and tests/api/test_hostile_inputs.py check.
            "stateful": {
                "enabled": True,
                "max-steps": 20,
                "generation": {"mode": "positive", "allow-x00": False, "codec": "utf-8"},
            },
        },
        # Every check; `max_response_time` alone stays off: it asserts a timing, and this
        # shared 2-core machine decides those, not the app. A rejection may also be 413:
        # the documented answer to a telemetry batch over its item limits (or a body over
        # the size limit).
        "checks": {
            "enabled": True,
            "negative_data_rejection": {"expected-statuses": REJECTED},
        },
        "operations": [
            {
                # The stream never ends by itself: its events are read for 1 s at most.
                # (`include-name`: schemathesis ORs `include-path` and `include-method`.)
                "include-name": "GET /api/v1/stream",
                "request-timeout": 1,
                "max-stream-events": 5,
            },
            *(
                {
                    "include-path-regex": path,
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
                }
                for path in sorted({path for path, _ in RULES_BEYOND_THE_SCHEMA})
            ),
            *(
                {"include-name": f"{method} {path}", "phases": {"coverage": {"enabled": False}}}
                for method, path in refused(role, spec)
            ),
        ],
    }
    if role == "operator":
        # /metrics takes its own credential (MOTORCADE_METRICS_TOKEN), the operators':
        # the other roles' runs see its 401.
        config["operations"].append(
            {
                "include-name": "GET /metrics",
                "headers": {"Authorization": f"Bearer {METRICS_TOKEN}"},
            }
        )
    if role == "device":
        # Its own vehicle, so the device's reads find a row (any other id is 403 or 404).
        config["parameters"] = {"vehicle_id": DEVICE_VEHICLE}
    return config


@dataclass
class RunResult:
    cases: dict[str, int]
    failures: list[str]
    errors: list[str]
    seconds: float


def run_schemathesis(spec: dict[str, Any], config: dict[str, Any]) -> RunResult:
    """The engine of `schemathesis run` over `spec`: its phases in order, its events folded
    into the CLI's statistic (cases, failures grouped by operation and case)."""
    started = time.monotonic()
    schema = schemathesis.openapi.from_dict(spec, config=schemathesis.Config.from_dict(config))
    statistic = Statistic()
    cases: dict[str, int] = {}
    errors: list[str] = []
    for event_ in from_schema(schema).execute():
        if isinstance(event_, events.ScenarioFinished):
            statistic.on_scenario_finished(event_.recorder)
            phase = event_.phase.value
            cases[phase] = cases.get(phase, 0) + len(event_.recorder.cases)
        elif isinstance(event_, events.NonFatalError):
            errors.append(f"{event_.label}: {event_.info.format()}")
        elif isinstance(event_, events.FatalError):
            errors.append(f"fatal: {event_.exception!r}")
    failures = []
    for label, grouped in sorted(statistic.failures.items()):
        for group in grouped.values():
            response = group.response
            for failure in group.failures:
                # A stateful sequence's label is "Stateful tests": name the operation.
                where = failure.operation if failure.operation not in (None, label) else ""
                failures.append(
                    f"{label}{f' ({where})' if where else ''} [{failure.code}]"
                    f" {failure.title}: {failure.message}\n"
                    f"  response: {response.status_code if response else None}"
                    f" {(response.text if response else '')[:300]!r}\n"
                    f"  reproduce: {group.code_sample}"
                )
    return RunResult(cases, failures, errors, time.monotonic() - started)


@pytest.mark.slow
@pytest.mark.parametrize("role", list(FLOORS))
async def test_schemathesis_finds_nothing(seeded: Seeded, role: str) -> None:
    async with httpx.AsyncClient(base_url=seeded.url, timeout=30) as http:
        spec = (await http.get("/openapi.json", headers=bearer(seeded.tokens["viewer"]))).json()
    # In a process of its own: the engine and the app under test each get a core.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = await asyncio.get_running_loop().run_in_executor(
            pool, run_schemathesis, spec, config_for(seeded, role, spec)
        )
    total = sum(result.cases.values())
    print(
        f"\nschemathesis as {role}: {total} cases {result.cases}, {len(result.failures)}"
        f" failures, {len(result.errors)} errors, {result.seconds:.0f} s"
    )
    if result.failures or result.errors:
        report = "\n".join(result.failures + result.errors)
        rerun = f"pytest -s tests/api/test_schemathesis.py -k {role}"
        pytest.fail(f"as {role} (re-run: {rerun}):\n{report}", pytrace=False)
    assert total >= FLOORS[role], f"only {total} cases as {role}"
