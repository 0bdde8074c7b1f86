"""A scoped viewer (regions, models, orgs, and a mix) sees exactly what is inside its scope on
every read, through the real app over real PostgreSQL: the vehicle list (filters, `q`, sort,
every cursor page), one vehicle and its timeline (out of scope: NOT_FOUND, as if absent),
desired states, rollouts (list, detail, their vehicles), the fleet summary, the health
report and the audit log (list and export). The fleet of each test lives in regions, models
and orgs of its own, so the whole answer of a scoped caller can be compared with the exact
expected set; the unscoped viewer seeing everything shows each comparison could fail."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.testing import WorkflowEnvironment

from core.settings import Settings
from core.temporal import rollout_workflow_id
from services.fleet import refresh_fleet_counts
from services.reconcile import record_drift
from tests.api.conftest import all_pages, bearer, serve_app
from tests.api.test_envelopes import assert_error
from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import insert_signed_release, insert_vehicles


@dataclass(frozen=True)
class Car:
    id: str
    region: str
    model: str
    org: str
    status: str = "in_sync"
    codes: tuple[str, ...] = ()


@dataclass
class Fleet:
    prefix: str
    cars: list[Car]
    rollouts: dict[str, int]  # name -> id
    rollout_cars: dict[str, set[str]]  # name -> vehicle ids it targets
    release: str

    def visible(self, scope: dict[str, list[str]]) -> list[Car]:
        return [
            c
            for c in self.cars
            if c.region in scope.get("regions", [c.region])
            and c.model in scope.get("models", [c.model])
            and c.org in scope.get("orgs", [c.org])
        ]

    def ids(self, scope: dict[str, list[str]]) -> list[str]:
        return sorted(c.id for c in self.visible(scope))

    def visible_rollouts(self, scope: dict[str, list[str]]) -> set[int]:
        inside = set(self.ids(scope))
        return {self.rollouts[n] for n, cars in self.rollout_cars.items() if cars <= inside}


def _cars(prefix: str) -> list[Car]:
    """Two regions, two models, two orgs of this test's own; statuses and reason codes in
    each."""
    r1, r2 = f"{prefix}north", f"{prefix}south"
    m1, m2 = f"{prefix}m1", f"{prefix}m2"
    o1, o2 = f"{prefix}o1", f"{prefix}o2"
    cars = [Car(f"{prefix}N{i}", r1, m1, o1) for i in range(1, 8)]
    cars[0] = Car(cars[0].id, r1, m1, o1, "blocked", ("BATTERY_LOW",))
    cars += [
        Car(f"{prefix}N8", r1, m2, o2, "failed", ("NETWORK_UNREACHABLE",)),
        Car(f"{prefix}S1", r2, m1, o1, "failed", ("APPLY_FAILED",)),
        Car(f"{prefix}S2", r2, m1, o1),
        Car(f"{prefix}S3", r2, m1, o1, "blocked", ("NOT_STATIONARY", "BATTERY_LOW")),
        Car(f"{prefix}S4", r2, m2, o2, "offline"),
    ]
    return cars


def _rollout_selections(prefix: str) -> dict[str, dict[str, list[str]]]:
    """The targets of the three rollouts, by name: each inside one corner of the fleet."""
    p = prefix
    return {
        "north-m1": {"regions": [f"{p}north"], "models": [f"{p}m1"], "orgs": [f"{p}o1"]},
        "south-m2": {"regions": [f"{p}south"], "models": [f"{p}m2"], "orgs": [f"{p}o2"]},
        "south-m1": {"regions": [f"{p}south"], "models": [f"{p}m1"], "orgs": [f"{p}o1"]},
    }


def _insert_cars(database_url: str, cars: list[Car]) -> None:
    """The cars, in sync, stationary and charged (so that rollouts may target them)."""
    for car in cars:
        insert_vehicles(database_url, [car.id], model=car.model, region=car.region)
    with psycopg.connect(database_url) as conn:
        for car in cars:
            conn.execute(
                "UPDATE vehicles SET org = %s, battery_percent = 90, stationary = true"
                " WHERE id = %s",
                (car.org, car.id),
            )


async def _create_rollouts(
    http: httpx.AsyncClient, operator: dict, prefix: str, release: str, cars: list[Car]
) -> tuple[dict[str, int], dict[str, set[str]]]:
    """The three rollouts, created through the API; their ids and the cars each targets."""
    rollouts: dict[str, int] = {}
    rollout_cars: dict[str, set[str]] = {}
    for name, targets in _rollout_selections(prefix).items():
        body = rollout_body(
            release,
            name=f"{prefix}{name}",
            targets=targets,
            strategy={
                "canary": {"size": 1, "bakeSeconds": 3600},
                "waves": [{"percent": 100, "bakeSeconds": 0}],
            },
        )
        response = await http.post("/api/v1/rollouts", headers=operator, json=body)
        assert response.status_code == 201, response.text
        rollouts[name] = int(response.json()["data"]["id"])
        rollout_cars[name] = {
            c.id
            for c in cars
            if c.region in targets["regions"]
            and c.model in targets["models"]
            and c.org in targets["orgs"]
        }
    return rollouts, rollout_cars


def _write_history(database_url: str, fleet: Fleet) -> None:
    """What the fleet's life would have left: each car's status and reason codes, a desired
    state and an audit entry about it; each rollout's notified targets and its target-set
    desired state; and an audit entry about nothing scoped."""
    prefix, release = fleet.prefix, fleet.release
    with psycopg.connect(database_url) as conn:
        # After the rollouts (which target in_sync, stationary, charged vehicles): statuses.
        for car in fleet.cars:
            conn.execute(
                "UPDATE vehicles SET status = %s, reason_codes = %s,"
                " desired_release_version = %s WHERE id = %s",  # all drifted (for reconcile)
                (car.status, list(car.codes), release, car.id),
            )
            conn.execute(
                "INSERT INTO desired_states (id, vehicle_id, release_version, created_by)"
                " VALUES (%s, %s, %s, 'test')",
                (str(uuid.uuid4()), car.id, release),
            )
            conn.execute(
                "INSERT INTO audit_log (actor, source, action, target_type, target_id, result,"
                " regions, models, orgs) VALUES ('test', 'api', %s, 'vehicle', %s, 'ok',"
                " %s, %s, %s)",
                (f"{prefix}touched", car.id, [car.region], [car.model], [car.org]),
            )
        for name, rid in fleet.rollouts.items():
            # As if the rollout had notified its vehicles (no worker runs here).
            for rank, vid in enumerate(sorted(fleet.rollout_cars[name])):
                conn.execute(
                    "INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state,"
                    " notified_at) VALUES (%s, %s, 0, %s, 'notified', now())",
                    (rid, vid, rank),
                )
                conn.execute("UPDATE vehicles SET rollout_id = %s WHERE id = %s", (rid, vid))
        for rid in fleet.rollouts.values():  # a target-set desired state of each rollout
            conn.execute(
                "INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,"
                " created_by) VALUES (%s, NULL, %s, %s, 'test')",
                (str(uuid.uuid4()), release, rid),
            )
        # An entry about nothing scoped (a release): outside every scope.
        conn.execute(
            "INSERT INTO audit_log (actor, source, action, target_type, target_id, result)"
            " VALUES ('test', 'api', %s, 'release', %s, 'ok')",
            (f"{prefix}touched", release),
        )


@pytest.fixture
async def fleet(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    sessions: Any,
    dev_server_env: WorkflowEnvironment,
) -> AsyncIterator[Fleet]:
    """Two regions, two models, two orgs of this test's own; statuses and reason codes in
    each; three rollouts (each inside one corner of the fleet); desired states and audit
    entries about every vehicle; the fleet counts refreshed."""
    cars = _cars(prefix)
    _insert_cars(database_url, cars)
    release = f"{prefix}2030.1.0"
    insert_signed_release(database_url, signing_key, release)
    rollouts, rollout_cars = await _create_rollouts(http, operator, prefix, release, cars)
    fleet = Fleet(prefix, cars, rollouts, rollout_cars, release)
    _write_history(database_url, fleet)
    async with sessions() as session:
        await refresh_fleet_counts(session)
        await session.commit()
    yield fleet
    # Their workflows never ran: end them, so no later worker acts on these rows.
    for rid in rollouts.values():
        handle = dev_server_env.client.get_workflow_handle(rollout_workflow_id(rid))
        with contextlib.suppress(Exception):
            await handle.terminate("test over")


def scopes_of(f: Fleet) -> dict[str, dict[str, list[str]]]:
    return {
        "regions": {"regions": [f"{f.prefix}north"]},
        "models": {"models": [f"{f.prefix}m2"]},
        "orgs": {"orgs": [f"{f.prefix}o1"]},
        "region+model": {"regions": [f"{f.prefix}north"], "models": [f"{f.prefix}m1"]},
        "two regions, one org": {
            "regions": [f"{f.prefix}north", f"{f.prefix}south"],
            "orgs": [f"{f.prefix}o2"],
        },
    }


SCOPE_NAMES = ["regions", "models", "orgs", "region+model", "two regions, one org"]


def ids_of(items: list[dict[str, Any]], key: str = "id") -> list[Any]:
    return [i[key] for i in items]


@pytest.mark.parametrize("scope_name", SCOPE_NAMES)
async def test_vehicle_reads_stay_inside_the_scope(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    viewer: dict,
    fleet: Fleet,
    scope_name: str,
) -> None:
    scope = scopes_of(fleet)[scope_name]
    expected = fleet.ids(scope)
    assert expected and len(expected) < len(fleet.cars)  # a leak would show
    headers = bearer(token("viewer", scopes=scope))
    p = fleet.prefix

    # The whole list, page by page (this test's regions/models/orgs are its own: no `q`).
    assert ids_of(await all_pages(http, headers, "/api/v1/vehicles?limit=3")) == expected
    assert ids_of(await all_pages(http, headers, f"/api/v1/vehicles?q={p}&limit=2")) == expected
    descending = await all_pages(http, headers, f"/api/v1/vehicles?q={p}&limit=3&sort=-id")
    assert ids_of(descending) == expected[::-1]
    by_status = await all_pages(http, headers, f"/api/v1/vehicles?q={p}&limit=2&sort=status")
    assert sorted(ids_of(by_status)) == expected
    # Filters naming what is outside the scope add nothing.
    for query, keep in (
        (f"region={p}north,{p}south", lambda c: True),
        (f"region={p}south", lambda c: c.region == f"{p}south"),
        (f"model={p}m2", lambda c: c.model == f"{p}m2"),
        ("status=failed,blocked,offline", lambda c: c.status != "in_sync"),
        ("reasonCode=BATTERY_LOW", lambda c: "BATTERY_LOW" in c.codes),
    ):
        got = await all_pages(http, headers, f"/api/v1/vehicles?q={p}&limit=2&{query}")
        assert ids_of(got) == [i for i in expected if keep(_car(fleet, i))], query
    for name, rid in fleet.rollouts.items():  # a rollout's vehicles: its part inside
        query = f"/api/v1/vehicles?q={p}&limit=2&rolloutId={rid}"
        everyone = ids_of(await all_pages(http, viewer, query))
        assert everyone == sorted(fleet.rollout_cars[name])
        got = ids_of(await all_pages(http, headers, query))
        assert got == [i for i in everyone if i in set(expected)]

    inside = set(expected)
    for car in fleet.cars:
        one = await http.get(f"/api/v1/vehicles/{car.id}", headers=headers)
        timeline = await http.get(f"/api/v1/vehicles/{car.id}/timeline", headers=headers)
        legacy = await http.get(f"/api/v1/vehicles/{car.id}/events", headers=headers)
        if car.id in inside:
            assert one.status_code == 200 and one.json()["data"]["id"] == car.id
            assert timeline.status_code == 200 and legacy.status_code == 200
        else:  # exactly as a vehicle that does not exist
            for response in (one, timeline, legacy):
                body = assert_error(response, 404, "NOT_FOUND")
                assert car.region not in response.text and car.model not in response.text
            absent = await http.get(f"/api/v1/vehicles/{p}absent", headers=headers)
            assert one.json()["error"]["message"].replace(car.id, "X") == absent.json()["error"][
                "message"
            ].replace(f"{p}absent", "X")
            assert body["error"]["details"] == []
        # The devices' desired state is no viewer's: one answer, inside the scope or not.
        desired = await http.get(f"/api/v1/vehicles/{car.id}/desired-state", headers=headers)
        assert_error(desired, 403, "FORBIDDEN")

    # Desired states: only those of vehicles inside the scope, whatever the filter names.
    every = ",".join(c.id for c in fleet.cars)
    states = await all_pages(http, headers, f"/api/v1/desired-states?vehicleId={every}&limit=4")
    assert sorted(ids_of(states, "vehicleId")) == expected
    # ... and only the visible rollouts' target-set ones.
    visible = fleet.visible_rollouts(scope)
    for rid in fleet.rollouts.values():
        query = f"/api/v1/desired-states?rolloutId={rid}&limit=2"
        everyone = await all_pages(http, viewer, query)
        assert everyone and all(d["rolloutId"] == rid for d in everyone)
        got = await all_pages(http, headers, query)
        assert got == (everyone if rid in visible else []), rid


def _car(fleet: Fleet, vid: str) -> Car:
    return next(c for c in fleet.cars if c.id == vid)


async def test_the_unscoped_viewer_sees_every_vehicle(
    http: httpx.AsyncClient, viewer: dict, fleet: Fleet
) -> None:
    """What the scoped comparisons above would show if the scope were not applied."""
    everything = sorted(c.id for c in fleet.cars)
    got = await all_pages(http, viewer, f"/api/v1/vehicles?q={fleet.prefix}&limit=3")
    assert ids_of(got) == everything
    for car in fleet.cars:
        assert (await http.get(f"/api/v1/vehicles/{car.id}", headers=viewer)).status_code == 200
    states = await all_pages(
        http, viewer, f"/api/v1/desired-states?vehicleId={','.join(everything)}&limit=4"
    )
    assert sorted(ids_of(states, "vehicleId")) == everything
    rollouts = await all_pages(http, viewer, f"/api/v1/rollouts?releaseVersion={fleet.release}")
    assert set(ids_of(rollouts)) == set(fleet.rollouts.values())


@pytest.mark.parametrize("scope_name", SCOPE_NAMES)
async def test_rollout_reads_stay_inside_the_scope(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    viewer: dict,
    fleet: Fleet,
    scope_name: str,
) -> None:
    scope = scopes_of(fleet)[scope_name]
    headers = bearer(token("viewer", scopes=scope))
    visible = fleet.visible_rollouts(scope)
    listed = await all_pages(http, headers, "/api/v1/rollouts?limit=1")
    # Every rollout this caller sees is one of this test's (its scope names only our fleet).
    assert set(ids_of(listed)) == visible
    by_release = await all_pages(
        http, headers, f"/api/v1/rollouts?releaseVersion={fleet.release}&limit=1&sort=id"
    )
    assert ids_of(by_release) == sorted(visible)
    inside = set(fleet.ids(scope))
    for name, rid in fleet.rollouts.items():
        one = await http.get(f"/api/v1/rollouts/{rid}", headers=headers)
        vehicles = await http.get(f"/api/v1/rollouts/{rid}/vehicles", headers=headers)
        if rid in visible:
            assert one.status_code == 200, one.text
            # No worker runs here, so nothing is expanded yet: its progress counts are the
            # unscoped caller's (a rollout is visible only when all its targets are inside).
            unscoped = await http.get(f"/api/v1/rollouts/{rid}", headers=viewer)
            assert one.json()["data"] == unscoped.json()["data"]
            assert fleet.rollout_cars[name] <= inside
            rows = await all_pages(http, headers, f"/api/v1/rollouts/{rid}/vehicles?limit=2")
            assert {r["vehicleId"] for r in rows} == fleet.rollout_cars[name]
        else:
            assert_error(one, 404, "NOT_FOUND")
            assert_error(vehicles, 404, "NOT_FOUND")
            assert name not in one.text


@pytest.mark.parametrize("scope_name", SCOPE_NAMES)
async def test_counts_stay_inside_the_scope(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    sessions: Any,
    fleet: Fleet,
    scope_name: str,
) -> None:
    scope = scopes_of(fleet)[scope_name]
    headers = bearer(token("viewer", scopes=scope))
    cars = fleet.visible(scope)
    statuses = Counter(c.status for c in cars)
    codes = Counter(code for c in cars for code in c.codes)

    summary = (await http.get("/api/v1/fleet/summary", headers=headers)).json()["data"]
    assert summary["total"] == len(cars)
    assert {k: v for k, v in summary["byStatus"].items() if v} == dict(statuses)
    for place, attr in (("byRegion", "region"), ("byModel", "model")):
        expected = Counter(getattr(c, attr) for c in cars)
        assert {k: v["total"] for k, v in summary[place].items()} == dict(expected), place
    assert sum(v["total"] for v in summary["byRing"].values()) == len(cars)
    top = {c["reasonCode"]: c["vehicles"] for c in summary["topReasonCodes"]}
    assert top == dict(codes)

    health = await http.get("/api/v1/reports/health", headers=headers)
    assert health.status_code == 200, health.text
    report = health.json()["data"]
    assert report["total"] == len(cars)
    assert {k: v for k, v in report["byStatus"].items() if v} == dict(statuses)
    assert report["offline"] == statuses["offline"]
    assert {c["reasonCode"]: c["vehicles"] for c in report["topReasonCodes"]} == dict(codes)

    # The reconcile report: a run recorded now, whose drift rows are every vehicle of ours.
    async with sessions() as session:
        run = await record_drift(session, run_key=f"{fleet.prefix}{scope_name}")
        await session.commit()
    reconcile = await http.get("/api/v1/reports/reconcile", headers=headers)
    assert reconcile.status_code == 200, reconcile.text
    data = reconcile.json()["data"]
    assert data["latest"]["id"] == run.run_id
    assert data["latest"]["drifted"] == len(cars) and data["latest"]["markedOffline"] is None
    drift: Counter[tuple[str, str, str, str]] = Counter()
    for row in data["drift"]:
        drift[(row["status"], row["region"], row["model"], row["org"])] += row["vehicles"]
    assert drift == Counter((c.status, c.region, c.model, c.org) for c in cars)


async def test_the_unscoped_counts_include_every_region(
    http: httpx.AsyncClient, viewer: dict, sessions: Any, fleet: Fleet
) -> None:
    summary = (await http.get("/api/v1/fleet/summary", headers=viewer)).json()["data"]
    for region in (f"{fleet.prefix}north", f"{fleet.prefix}south"):
        assert summary["byRegion"][region]["total"] == sum(c.region == region for c in fleet.cars)
    health = (await http.get("/api/v1/reports/health", headers=viewer)).json()["data"]
    assert health["total"] >= len(fleet.cars)
    async with sessions() as session:
        await record_drift(session, run_key=f"{fleet.prefix}unscoped")
        await session.commit()
    data = (await http.get("/api/v1/reports/reconcile", headers=viewer)).json()["data"]
    ours = [d for d in data["drift"] if d["region"].startswith(fleet.prefix)]
    assert sum(d["vehicles"] for d in ours) == len(fleet.cars)


@pytest.mark.parametrize("scope_name", SCOPE_NAMES)
async def test_audit_reads_stay_inside_the_scope(
    http: httpx.AsyncClient, token: Callable[..., str], viewer: dict, fleet: Fleet, scope_name: str
) -> None:
    scope = scopes_of(fleet)[scope_name]
    headers = bearer(token("viewer", scopes=scope))
    expected = fleet.ids(scope)
    action = f"{fleet.prefix}touched"

    touched = await all_pages(http, headers, f"/api/v1/audit-log?action={action}&limit=2")
    assert sorted(ids_of(touched, "targetId")) == expected
    everything = await all_pages(http, viewer, f"/api/v1/audit-log?action={action}&limit=5")
    assert len(everything) == len(fleet.cars) + 1  # the unscoped viewer sees them all

    # Unfiltered, page by page: only entries about what is inside the scope (the vehicles'
    # and the visible rollouts'); this test's scope values name nothing else.
    rollouts = {str(r) for r in fleet.visible_rollouts(scope)}
    unfiltered = await all_pages(http, headers, "/api/v1/audit-log?limit=7")
    assert {e["targetId"] for e in unfiltered} == set(expected) | rollouts
    assert all(e["targetType"] in ("vehicle", "rollout") for e in unfiltered)

    export = await http.get("/api/v1/audit-log/export", headers=headers)
    assert export.status_code == 200, export.text
    lines = [json.loads(line) for line in export.text.splitlines() if line]
    assert sorted(e["id"] for e in lines) == sorted(e["id"] for e in unfiltered)
    filtered = await http.get(f"/api/v1/audit-log/export?action={action}", headers=headers)
    exported = [json.loads(line)["targetId"] for line in filtered.text.splitlines() if line]
    assert sorted(exported) == expected
    # Asking for an out-of-scope target by id yields nothing.
    outside = [c.id for c in fleet.cars if c.id not in set(expected)]
    hidden = await http.get(
        "/api/v1/audit-log", params={"targetId": ",".join(outside)}, headers=headers
    )
    assert hidden.status_code == 200 and hidden.json()["data"] == []


# --- Writes: what a refusal tells a scoped operator -----------------------------------------

_VOLATILE = re.compile(r'"(requestId|timestamp)":"[^"]*"')


def same_answer(a: httpx.Response, b: httpx.Response, *replace: tuple[str, str]) -> None:
    """`a` and `b` are the same answer, byte for byte, apart from the request id and the
    timestamp (and, in `b`, the texts `replace` names swapped for `a`'s)."""
    text_b = b.text
    for old, new in replace:
        text_b = text_b.replace(old, new)
    assert a.status_code == b.status_code
    assert _VOLATILE.sub("", a.text) == _VOLATILE.sub("", text_b), (a.text, b.text)


def _registration(vid: str, region: str, **over: str) -> dict[str, str]:
    return {"id": vid, "model": "m", "region": region, "ring": "r", "org": "default", **over}


async def test_registration_tells_a_scoped_operator_nothing_about_ids(
    http: httpx.AsyncClient,
    operator: dict,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
) -> None:
    """By default a scoped operator registers nothing, and its answer is the same whatever
    the id: one that exists outside its scope, one that exists nowhere, for a vehicle inside
    or outside its scope."""
    north, south = f"{prefix}north", f"{prefix}south"
    taken = f"{prefix}TAKEN"
    insert_vehicles(database_url, [taken], region=south)
    scoped = bearer(token("operator", scopes={"regions": [north]}))
    free = f"{prefix}FREE"
    answers = [
        await http.post("/api/v1/vehicles", headers=scoped, json=_registration(vid, region))
        for vid in (taken, free)
        for region in (north, south)
    ]
    assert_error(answers[0], 403, "FORBIDDEN")
    for other in answers[1:]:
        same_answer(answers[0], other)
    batch = {"vehicles": [_registration(free, north), _registration(taken, north)]}
    same_answer(answers[0], await http.post("/api/v1/vehicles", headers=scoped, json=batch))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT id, region FROM vehicles WHERE id LIKE %s ORDER BY id", (f"{prefix}%",)
        ).fetchall()
    assert rows == [(taken, south)]
    # The unscoped operator is told the id is taken (the comparison could fail).
    unscoped = await http.post(
        "/api/v1/vehicles", headers=operator, json=_registration(taken, north)
    )
    assert_error(unscoped, 409, "CONFLICT")


async def test_allowed_scoped_registration_answers_alike_wherever_an_id_is_taken(
    token: Callable[..., str], api_settings: Settings, database_url: str, prefix: str
) -> None:
    """With `MOTORCADE_SCOPED_VEHICLE_REGISTRATION`, a taken id is a 409 that says the same
    whether the vehicle holding it is inside the caller's scope or outside, and a vehicle
    outside the scope is a 403 that says the same whether its id exists or not."""
    north, south = f"{prefix}north", f"{prefix}south"
    inside, outside = f"{prefix}IN", f"{prefix}OUT"
    insert_vehicles(database_url, [inside], region=north)
    insert_vehicles(database_url, [outside], region=south)
    scoped = bearer(token("operator", scopes={"regions": [north]}))
    allowed = api_settings.model_copy(update={"scoped_vehicle_registration": True})
    async with serve_app(allowed) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        post = http.post
        held_inside = await post(
            "/api/v1/vehicles", headers=scoped, json=_registration(inside, north)
        )
        held_outside = await post(
            "/api/v1/vehicles", headers=scoped, json=_registration(outside, north)
        )
        assert_error(held_inside, 409, "CONFLICT")
        same_answer(held_inside, held_outside, (outside, inside))
        refused = await post("/api/v1/vehicles", headers=scoped, json=_registration(outside, south))
        fresh = await post(
            "/api/v1/vehicles", headers=scoped, json=_registration(f"{prefix}NEW", south)
        )
        assert_error(refused, 403, "FORBIDDEN")
        same_answer(refused, fresh)
        created = await post(
            "/api/v1/vehicles", headers=scoped, json=_registration(f"{prefix}NEW", north)
        )
        assert created.status_code == 201, created.text


def _hidden_rollout(database_url: str, release: str, vehicle_ids: list[str]) -> int:
    """An active rollout, not yet expanded, over `vehicle_ids` (as the workflow would leave
    it before its first stage; no worker runs here)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO rollouts (release_version, targets, status, created_by)"
            " VALUES (%s, %s, 'running', 'test') RETURNING id",
            (release, json.dumps({"vehicleIds": vehicle_ids})),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _finish(database_url: str, rollout_id: int) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'aborted' WHERE id = %s", (rollout_id,))


async def test_an_overlap_names_no_rollout_outside_the_scope(
    http: httpx.AsyncClient,
    operator: dict,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """A scoped operator whose targets are held by a rollout outside its scope (it also
    targets the other region) is told how many of its own vehicles are held, never that
    rollout's id nor how many vehicles or rollouts lie outside: the dry run and the 409 are
    the same answers for two different hidden rollouts of different sizes. A holding rollout
    inside its scope is named."""
    north, south = f"{prefix}north", f"{prefix}south"
    release = f"{prefix}2031.1.0"
    insert_signed_release(database_url, signing_key, release)
    mine = [f"{prefix}N1", f"{prefix}N2"]
    theirs = [f"{prefix}S{i}" for i in range(1, 6)]
    insert_vehicles(database_url, mine, region=north)
    insert_vehicles(database_url, theirs, region=south)
    scoped = bearer(token("operator", scopes={"regions": [north]}))
    body = rollout_body(release, targets={"regions": [north], "vehicleIds": mine[:1]})

    async def answers() -> tuple[httpx.Response, httpx.Response]:
        dry = await http.post("/api/v1/rollouts?dryRun=true", headers=scoped, json=body)
        assert dry.status_code == 200, dry.text
        create = await http.post("/api/v1/rollouts", headers=scoped, json=body)
        assert_error(create, 409, "CONFLICT")
        return dry, create

    first = _hidden_rollout(database_url, release, [mine[0], *theirs[:1]])
    dry_1, refused_1 = await answers()
    assert dry_1.json()["data"]["overlap"] == {
        "vehicles": 1,
        "sampleVehicleIds": mine[:1],
        "rolloutIds": [],
    }
    assert dry_1.json()["data"]["canStart"] is False
    _finish(database_url, first)
    second = _hidden_rollout(database_url, release, [mine[0], *theirs])
    dry_2, refused_2 = await answers()
    same_answer(dry_1, dry_2)
    same_answer(refused_1, refused_2)
    # (Equal answers for two hidden rollouts of different ids: neither id is in them.)
    assert first != second
    assert "visible to you" not in refused_1.text
    # The unscoped operator is told which rollout (the comparison could fail) ...
    unscoped = await http.post("/api/v1/rollouts?dryRun=true", headers=operator, json=body)
    assert unscoped.json()["data"]["overlap"]["rolloutIds"] == [second]
    _finish(database_url, second)
    # ... and so is the scoped one, of a holding rollout inside its scope.
    visible = _hidden_rollout(database_url, release, mine)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE rollouts SET targets = %s WHERE id = %s",
            (json.dumps({"regions": [north], "vehicleIds": mine}), visible),
        )
    dry, refused = await answers()
    assert dry.json()["data"]["overlap"]["rolloutIds"] == [visible]
    assert str(visible) in refused.json()["error"]["message"]
    _finish(database_url, visible)


async def test_a_vehicle_names_no_rollout_outside_the_scope(
    http: httpx.AsyncClient,
    viewer: dict,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """A scoped viewer's vehicle inside a rollout that also reaches another region: the
    vehicle (one and listed) and its desired state show no rollout id, and filtering by that
    rollout's id answers as for an id that does not exist. A rollout inside the scope is
    shown; the unscoped viewer sees both (the comparisons could fail)."""
    north, south = f"{prefix}north", f"{prefix}south"
    release = f"{prefix}2032.1.0"
    insert_signed_release(database_url, signing_key, release)
    mine, theirs = f"{prefix}N1", f"{prefix}S1"
    shown = f"{prefix}N2"
    insert_vehicles(database_url, [mine, shown], region=north)
    insert_vehicles(database_url, [theirs], region=south)
    hidden = _hidden_rollout(database_url, release, [mine, theirs])
    visible = _hidden_rollout(database_url, release, [shown])
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE rollouts SET targets = %s WHERE id = %s",
            (json.dumps({"regions": [north], "vehicleIds": [shown]}), visible),
        )
        for vid, rid in ((mine, hidden), (theirs, hidden), (shown, visible)):
            state = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO desired_states (id, vehicle_id, release_version, rollout_id,"
                " created_by) VALUES (%s, %s, %s, %s, 'test')",
                (state, vid, release, rid),
            )
            conn.execute(
                "UPDATE vehicles SET rollout_id = %s, desired_state_id = %s,"
                " desired_release_version = %s WHERE id = %s",
                (rid, state, release, vid),
            )
            conn.execute(
                "INSERT INTO rollout_targets (rollout_id, vehicle_id, stage, rank, state)"
                " VALUES (%s, %s, 0, 0, 'notified')",
                (rid, vid),
            )
    scoped = bearer(token("viewer", scopes={"regions": [north]}))
    try:
        for who, expect_hidden in ((scoped, None), (viewer, hidden)):
            one = (await http.get(f"/api/v1/vehicles/{mine}", headers=who)).json()["data"]
            assert one["desired"]["rolloutId"] == expect_hidden
            listed = await all_pages(http, who, f"/api/v1/vehicles?q={prefix}N")
            assert {v["id"]: v["desired"]["rolloutId"] for v in listed} == {
                mine: expect_hidden,
                shown: visible,
            }
            states = await all_pages(http, who, f"/api/v1/desired-states?vehicleId={mine},{shown}")
            assert {d["vehicleId"]: d["rolloutId"] for d in states} == {
                mine: expect_hidden,
                shown: visible,
            }
        missing = hidden + visible + 1000
        for path in ("/api/v1/vehicles?rolloutId={}", "/api/v1/desired-states?rolloutId={}"):
            by_hidden = await http.get(path.format(hidden), headers=scoped)
            by_missing = await http.get(path.format(missing), headers=scoped)
            assert by_hidden.status_code == 200 and by_hidden.json()["data"] == []
            same_answer(by_missing, by_hidden)
            unscoped = await http.get(path.format(hidden), headers=viewer)
            assert unscoped.json()["data"] != []
    finally:
        _finish(database_url, hidden)
        _finish(database_url, visible)


async def test_targeting_an_id_outside_the_scope_answers_as_a_missing_id(
    http: httpx.AsyncClient,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """A scoped operator naming the id of a vehicle outside its scope in its targets (with its
    own region, as its scope requires) gets the answer an id that exists nowhere gets, byte
    for byte: from the dry run (what creating the rollout would do) and from a direct desired
    state."""
    north, south = f"{prefix}north", f"{prefix}south"
    release = f"{prefix}2033.1.0"
    insert_signed_release(database_url, signing_key, release)
    elsewhere, nowhere = f"{prefix}S1", f"{prefix}S9"
    insert_vehicles(database_url, [elsewhere], region=south)
    scoped = bearer(token("operator", scopes={"regions": [north]}))
    for url, make in (
        ("/api/v1/rollouts?dryRun=true", lambda t: rollout_body(release, targets=t)),
        (
            "/api/v1/desired-states",
            lambda t: {"releaseVersion": release, "targets": t, "reason": "test"},
        ),
    ):
        answers = [
            await http.post(
                url, headers=scoped, json=make({"regions": [north], "vehicleIds": [vid]})
            )
            for vid in (elsewhere, nowhere)
        ]
        assert answers[0].status_code in (200, 422), answers[0].text
        same_answer(answers[0], answers[1], (nowhere, elsewhere))
