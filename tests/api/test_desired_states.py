"""GET/POST /desired-states: direct desired states for a target set, under the same release
verification, safety policy and overlap rule as rollouts."""

from __future__ import annotations

from typing import Any, NamedTuple

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.api.conftest import all_pages, bearer
from tests.api.test_envelopes import assert_error
from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import insert_signed_release, insert_vehicles

URL = "/api/v1/desired-states"


def body(release: str, targets: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"releaseVersion": release, "targets": targets, "reason": "hotfix", **overrides}


class Written(NamedTuple):
    """What creating desired states left in PostgreSQL about some vehicles."""

    vehicles: list[tuple[Any, ...]]  # (id, desired release, status, desired state id) by id
    audit: list[tuple[Any, ...]]  # the request's `desired_states.created` entries
    feed: list[tuple[Any, ...]]  # (id, status, desired release, region) per vehicle.updated
    regions: dict[str, str]  # each vehicle's region


def written(database_url: str, ids: list[str], request_id: str) -> Written:
    with psycopg.connect(database_url) as conn:
        vehicles = conn.execute(
            "SELECT id, desired_release_version, status, desired_state_id::text FROM vehicles"
            " WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        ).fetchall()
        audit = conn.execute(
            "SELECT actor, role, source, reason, target_type, target_id, payload->>'count'"
            " FROM audit_log WHERE action = 'desired_states.created' AND correlation_id = %s",
            (request_id,),
        ).fetchall()
        feed = conn.execute(
            "SELECT d->>'id', d->>'status', d->'desired'->>'releaseVersion', d->>'region'"
            " FROM change_feed f, jsonb_array_elements(f.payload->'vehicles') d"
            " WHERE f.event = 'vehicle.updated' AND d->>'id' = ANY(%s) ORDER BY 1",
            (ids,),
        ).fetchall()
        regions: dict[str, str] = dict(
            conn.execute("SELECT id, region FROM vehicles WHERE id = ANY(%s)", (ids,)).fetchall()
        )
    return Written(vehicles, audit, feed, regions)


async def test_create_and_list_desired_states(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2027.2.0"
    insert_signed_release(database_url, signing_key, release)
    model = f"{prefix}m"
    ids = [f"{prefix}{i}" for i in range(5)]
    insert_vehicles(database_url, ids[:3], model=model, release="old")
    insert_vehicles(database_url, ids[3:], model=model, region="us-east", release="old")

    response = await http.post(
        URL,
        headers={**operator, "X-Request-ID": f"ds-{prefix}"},
        json=body(release, {"models": [model], "regions": ["eu-west"]}),
    )
    assert response.status_code == 201, response.text
    created = response.json()["data"]
    assert created["releaseVersion"] == release and created["count"] == 3
    assert [s["vehicleId"] for s in created["sample"]] == ids[:3]
    assert created["safetyChecks"]["minBatteryPercent"] == 30

    vehicles, audit, feed, regions = written(database_url, ids, f"ds-{prefix}")
    assert [(v[1], v[2]) for v in vehicles[:3]] == [(release, "pending")] * 3
    assert [(v[1], v[2]) for v in vehicles[3:]] == [("old", "in_sync")] * 2
    assert [v[3] for v in vehicles[:3]] == [s["desiredStateId"] for s in created["sample"]]
    assert audit == [("dev-operator", "operator", "api", "hotfix", "release", release, "3")]
    assert sorted(feed) == sorted((v, "pending", release, regions[v]) for v in ids[:3])

    # A second desired state links the first as its previous one.
    again = await http.post(URL, headers=operator, json=body(release, {"vehicleIds": ids[:1]}))
    assert again.status_code == 201, again.text

    listed = await http.get(URL, headers=viewer, params={"vehicleId": ids[0]})
    assert listed.status_code == 200, listed.text
    states = listed.json()["data"]
    assert len(states) == 2
    newest, oldest = states
    assert (
        newest["previousDesiredStateId"] == oldest["id"] == created["sample"][0]["desiredStateId"]
    )
    assert newest["createdBy"] == "dev-operator" and newest["rolloutId"] is None

    # Keyset pages over the release's desired states, newest first.
    pages = await all_pages(http, viewer, f"{URL}?releaseVersion={release}&limit=2")
    seen = [d["id"] for d in pages]
    assert len(seen) == len(set(seen)) == 4

    # Scoped viewers see only their vehicles' desired states.
    us = bearer(token("viewer", scopes={"regions": ["us-east"]}))
    assert (await http.get(URL, headers=us, params={"releaseVersion": release})).json()[
        "data"
    ] == []
    assert_error(
        await http.get(URL, headers=viewer, params={"cursor": "bad"}), 422, "VALIDATION_ERROR"
    )


async def test_desired_states_weakened_safety_signature_and_roles(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2027.2.1"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(2)]
    insert_vehicles(database_url, ids)
    targets = {"vehicleIds": ids}

    weak = body(release, targets, safetyChecks={"requireStationary": False}, reason=None)
    refused = assert_error(
        await http.post(URL, headers=operator, json=weak), 422, "SAFETY_POLICY_WEAKENED"
    )
    assert refused["error"]["details"][0]["field"] == "safetyChecks.requireStationary"
    acknowledged = {**weak, "acknowledgeWeakenedSafety": True, "reason": "parked in depot"}
    response = await http.post(
        URL, headers={**operator, "X-Request-ID": f"weak-{prefix}"}, json=acknowledged
    )
    assert response.status_code == 201, response.text
    assert response.json()["data"]["safetyChecks"]["requireStationary"] is False
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT reason, payload->'weakened' FROM audit_log"
            " WHERE action = 'desired_states.safety_weakened' AND correlation_id = %s",
            (f"weak-{prefix}",),
        ).fetchone()
    assert row == ("parked in depot", ["requireStationary"])

    tampered = f"{prefix}tampered"
    insert_signed_release(database_url, signing_key, tampered, signed_digest="sha256:ff")
    assert_error(
        await http.post(URL, headers=operator, json=body(tampered, targets)),
        422,
        "RELEASE_SIGNATURE_INVALID",
    )
    assert_error(
        await http.post(URL, headers=operator, json=body("no-such-release", targets)),
        422,
        "VALIDATION_ERROR",
    )
    assert_error(
        await http.post(URL, headers=operator, json=body(release, {})), 422, "VALIDATION_ERROR"
    )
    nothing = body(release, {"vehicleIds": [f"{prefix}absent"]})
    assert_error(await http.post(URL, headers=operator, json=nothing), 422, "VALIDATION_ERROR")
    assert_error(
        await http.post(URL, headers=viewer, json=body(release, targets)), 403, "FORBIDDEN"
    )
    scoped = bearer(token("operator", scopes={"regions": ["us-east"]}))
    assert_error(
        await http.post(URL, headers=scoped, json=body(release, targets)), 403, "FORBIDDEN"
    )


async def test_desired_states_respect_active_rollouts_and_the_cap(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2027.2.2"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{i}" for i in range(4)]
    insert_vehicles(database_url, ids)
    rollout = await http.post(
        "/api/v1/rollouts",
        headers=operator,
        json=rollout_body(release, targets={"vehicleIds": ids[:2]}),
    )
    assert rollout.status_code == 201, rollout.text
    rid = rollout.json()["data"]["id"]

    conflict = assert_error(
        await http.post(URL, headers=operator, json=body(release, {"vehicleIds": ids[1:]})),
        409,
        "CONFLICT",
    )
    assert str(rid) in conflict["error"]["message"]
    with psycopg.connect(database_url) as conn:
        untouched = conn.execute(
            "SELECT count(*) FROM desired_states WHERE vehicle_id = ANY(%s)", (ids,)
        ).fetchone()
    assert untouched == (0,)
    free = await http.post(URL, headers=operator, json=body(release, {"vehicleIds": ids[2:]}))
    assert free.status_code == 201 and free.json()["data"]["count"] == 2

    model = f"{prefix}big"
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO vehicles (id, model, region, ring, status, last_seen_at)"
            " SELECT %s || lpad(g::text, 6, '0'), %s, 'eu-west', 'broad', 'in_sync', now()"
            " FROM generate_series(1, 10001) g",
            (f"{prefix}B", model),
        )
    too_many = assert_error(
        await http.post(URL, headers=operator, json=body(release, {"models": [model]})),
        422,
        "VALIDATION_ERROR",
    )
    assert "rollout" in too_many["error"]["message"]


async def test_desired_states_carry_their_constraints(
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """The effective safety checks of a direct desired state go to its `constraints` column;
    the list and the vehicle's own desired state show them, and its ETag follows them."""
    release = f"{prefix}2027.3.0"
    insert_signed_release(database_url, signing_key, release)
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid], release="old")
    window = {"start": "01:00", "end": "05:00", "timezone": "Europe/Berlin", "days": ["sat"]}
    checks = {"minBatteryPercent": 55, "maintenanceWindow": window}
    created = await http.post(
        URL, headers=operator, json=body(release, {"vehicleIds": [vid]}, safetyChecks=checks)
    )
    assert created.status_code == 201, created.text
    expected = {"minBatteryPercent": 55, "requireStationary": True, "maintenanceWindow": window}
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT d.id::text, d.constraints FROM desired_states d"
            " JOIN vehicles v ON v.desired_state_id = d.id WHERE v.id = %s",
            (vid,),
        ).fetchone()
    assert stored is not None and stored[1] == expected  # the stationary default filled in

    listed = await http.get(URL, headers=viewer, params={"vehicleId": vid})
    assert [d["constraints"] for d in listed.json()["data"]] == [expected]

    device = bearer(token("device", vehicle_id=vid))
    url = f"/api/v1/vehicles/{vid}/desired-state"
    mine = await http.get(url, headers=device)
    assert mine.status_code == 200, mine.text
    data = mine.json()["data"]
    assert (data["desiredStateId"], data["constraints"]) == (stored[0], expected)
    etag = mine.headers["etag"]
    assert (await http.get(url, headers={**device, "If-None-Match": etag})).status_code == 304
    # Same desired state, other constraints: another ETag, so the vehicle reads them again.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE desired_states SET constraints = constraints || '{\"minBatteryPercent\": 70}'"
            " WHERE id = %s",
            (stored[0],),
        )
    again = await http.get(url, headers={**device, "If-None-Match": etag})
    assert again.status_code == 200 and again.headers["etag"] != etag
    assert again.json()["data"]["constraints"]["minBatteryPercent"] == 70
    # A desired state written before constraints existed shows none.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE desired_states SET constraints = NULL WHERE id = %s", (stored[0],))
    assert (await http.get(url, headers=device)).json()["data"]["constraints"] is None
