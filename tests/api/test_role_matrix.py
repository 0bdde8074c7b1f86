"""Every route of the app, for every kind of caller, answers the status code written below.

The routes come from the app itself (`app.routes`): a route without a row in MATRIX fails the
test, and so does a row whose route no longer exists. Path parameters are real rows of this
test (a vehicle, a release, a rollout), so 404 (not there, or outside the caller's scope) and
403 (the role may not) mean what they say.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import iter_route_contexts

from api.app import create_app
from core.settings import Settings
from services.signing import sign_release
from tests.api.conftest import bearer
from tests.api.test_envelopes import assert_error
from tests.api.test_releases_and_rollouts import rollout_body
from tests.api.test_rollout_control import create_rollout
from tests.factories import COMPONENTS

ROLES = ("none", "viewer", "operator", "device", "gateway", "scoped")

# (method, path template) -> expected status for ("none", "viewer", "operator", "device",
# "gateway", "scoped"). `device` is the device token of the test's own vehicle; `scoped` a
# viewer whose regions do not include that vehicle's.
READ = (401, 200, 200, 403, 403, 200)  # a list or report: a scoped caller sees its part
READ_ONE = (401, 200, 200, 403, 403, 404)  # one scoped row: out of scope is NOT_FOUND
UNSCOPED_ONE = (401, 200, 200, 403, 403, 200)  # releases are not scoped
PROBE = (200, 200, 200, 200, 200, 200)
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/healthz"): PROBE,
    ("GET", "/readyz"): PROBE,
    # its own credential (MOTORCADE_METRICS_TOKEN): no user token reads it
    ("GET", "/metrics"): (401, 401, 401, 401, 401, 401),
    # the API's description is public
    ("GET", "/openapi.json"): PROBE,
    ("GET", "/docs"): PROBE,
    # The dashboard and its sign-in are public (its data needs a token); without an issuer
    # configured there is no sign-in to start or finish (tests/api/test_dashboard.py).
    ("GET", "/"): PROBE,
    ("GET", "/ui/config.json"): PROBE,
    ("GET", "/auth/login"): (422,) * 6,
    ("GET", "/auth/callback"): (422,) * 6,
    ("POST", "/auth/session"): (401,) * 6,  # no sign-in left a token to collect
    ("GET", "/api/v1/me"): (401, 200, 200, 200, 200, 200),
    ("GET", "/api/v1/vehicles"): READ,
    ("GET", "/api/v1/vehicles/{vehicle_id}"): READ_ONE,
    ("GET", "/api/v1/vehicles/{vehicle_id}/timeline"): READ_ONE,
    ("GET", "/api/v1/vehicles/{vehicle_id}/events"): READ_ONE,
    ("GET", "/api/v1/vehicles/{vehicle_id}/desired-state"): (401, 403, 403, 200, 403, 403),
    ("POST", "/api/v1/telemetry"): (401, 403, 403, 202, 202, 403),
    ("GET", "/api/v1/releases"): READ,
    ("GET", "/api/v1/releases/{version}"): UNSCOPED_ONE,
    ("POST", "/api/v1/releases"): (401, 403, 201, 403, 403, 403),
    # dryRun=true: the plan, nothing stored
    ("POST", "/api/v1/rollouts"): (401, 403, 200, 403, 403, 403),
    ("GET", "/api/v1/rollouts"): READ,
    ("GET", "/api/v1/rollouts/{rollout_id}"): READ_ONE,
    ("GET", "/api/v1/rollouts/{rollout_id}/vehicles"): READ_ONE,
    # the rollout is completed: the operator may ask, the rollout refuses (409)
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): (401, 403, 409, 403, 403, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): (401, 403, 409, 403, 403, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/rollback"): (401, 403, 409, 403, 403, 403),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): (401, 403, 409, 403, 403, 403),
    ("GET", "/api/v1/desired-states"): READ,
    ("POST", "/api/v1/desired-states"): (401, 403, 201, 403, 403, 403),
    ("POST", "/api/v1/vehicles"): (401, 403, 201, 403, 403, 403),
    ("GET", "/api/v1/audit-log"): READ,
    ("GET", "/api/v1/audit-log/export"): READ,
    ("GET", "/api/v1/reports/reconcile"): READ,
    ("GET", "/api/v1/reports/health"): READ,
    ("GET", "/api/v1/fleet/summary"): READ,
    # an open event stream (its status is read, then the stream is closed)
    ("GET", "/api/v1/stream"): READ,
    ("POST", "/api/v1/stream/tickets"): (401, 201, 201, 403, 403, 201),
}
STREAMS = {("GET", "/api/v1/stream")}
DRY_RUN = {("POST", "/api/v1/rollouts")}  # asked with dryRun=true
ERROR_CODES = {401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND"}


def app_routes(settings: Settings) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves (HEAD and OPTIONS aside)."""
    app = create_app(settings)
    routes = set()
    for context in iter_route_contexts(app.routes):
        methods = getattr(context.original_route, "methods", None) or set()
        for method in methods - {"HEAD", "OPTIONS"}:
            assert context.path is not None
            routes.add((method, context.path))
    return routes


def test_every_route_has_a_row(api_settings: Settings) -> None:
    routes = app_routes(api_settings)
    missing = sorted(routes - set(MATRIX))
    stale = sorted(set(MATRIX) - routes)
    assert not missing, f"routes without a row in MATRIX: {missing}"
    assert not stale, f"rows in MATRIX for routes that do not exist: {stale}"


def desired_body(vehicle: str, release: str) -> dict[str, Any]:
    return {"releaseVersion": release, "targets": {"vehicleIds": [vehicle]}, "reason": "m"}


@dataclass(frozen=True)
class MatrixRows:
    """The rows the matrix's paths and bodies name: a completed rollout, a vehicle of it (in
    eu-west) with a desired state of its own, their release, and a new release to register."""

    prefix: str
    rollout_id: int
    vehicle: str
    release: str
    new_release: dict[str, Any]  # a registration body, signed by a trusted key

    def path(self, template: str) -> str:
        return template.format(
            vehicle_id=self.vehicle, version=self.release, rollout_id=str(self.rollout_id)
        )

    def body_for(self, method: str, template: str) -> dict[str, Any] | None:
        if method != "POST":
            return None
        if template == "/api/v1/telemetry":
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            heartbeat = {"vehicleId": self.vehicle, "sentAt": now, "batteryPercent": 80}
            return {"heartbeats": [heartbeat]}
        if template == "/api/v1/rollouts":
            return rollout_body(self.release, targets={"vehicleIds": [self.vehicle]})
        if template == "/api/v1/desired-states":
            return desired_body(self.vehicle, self.release)
        if template == "/api/v1/releases":
            return self.new_release
        if template == "/api/v1/vehicles":
            return {"id": f"{self.prefix}REG-1", "model": "m", "region": "eu-west", "ring": "r0"}
        return {"reason": "role matrix"}


async def _matrix_rows(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> MatrixRows:
    rollout_id = await create_rollout(http, operator, database_url, signing_key, prefix, n=2)
    vehicle = f"{prefix}000"  # a vehicle of that rollout, in eu-west
    release = f"{prefix}2027.1.0"
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE rollouts SET status = 'completed' WHERE id = %s", (rollout_id,))
    # The vehicle has a desired state of its own, so its device reads one.
    first = await http.post(
        "/api/v1/desired-states", headers=operator, json=desired_body(vehicle, release)
    )
    assert first.status_code == 201, first.text
    digest = "sha256:" + "12" * 32
    new_version = f"{prefix}2027.9.0"
    signature, kid = sign_release(signing_key, new_version, digest, COMPONENTS)
    new_release = {
        "version": new_version,
        "components": COMPONENTS,
        "artifactDigest": digest,
        "signature": signature,
        "signingKeyId": kid,
    }
    return MatrixRows(prefix, rollout_id, vehicle, release, new_release)


def _callers(token: Any, operator: dict, rows: MatrixRows) -> dict[str, dict[str, str]]:
    """The headers of each role of ROLES."""
    return {
        "none": {},
        "viewer": bearer(token("viewer")),
        "operator": operator,
        "device": bearer(token("device", vehicle_id=rows.vehicle)),
        "gateway": bearer(token("gateway")),
        "scoped": bearer(token("viewer", scopes={"regions": [f"{rows.prefix}elsewhere"]})),
    }


async def _call(
    http: httpx.AsyncClient, route: tuple[str, str], rows: MatrixRows, headers: dict[str, str]
) -> httpx.Response:
    """The route, asked once with these headers under a request id of its own. A stream is
    read no further than its status (and its error body), then closed."""
    method, template = route
    request = http.build_request(
        method,
        rows.path(template),
        params={"dryRun": "true"} if route in DRY_RUN else {},
        headers={**headers, "X-Request-ID": f"matrix-{uuid.uuid4()}"},
        json=rows.body_for(method, template),
    )
    response = await http.send(request, stream=route in STREAMS)
    if route in STREAMS:
        if response.status_code >= 400:
            await response.aread()
        await response.aclose()
    return response


async def test_role_matrix(
    http: httpx.AsyncClient,
    api_settings: Settings,
    operator: dict,
    token: Any,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    rows = await _matrix_rows(http, operator, database_url, prefix, signing_key)
    callers = _callers(token, operator, rows)
    mismatches = []
    for (method, template), expected in sorted(MATRIX.items()):
        for role, status in zip(ROLES, expected, strict=True):
            response = await _call(http, (method, template), rows, callers[role])
            if response.status_code != status:
                mismatches.append((method, template, role, status, response.status_code))
                continue
            if status in ERROR_CODES:
                assert_error(response, status, ERROR_CODES[status])
            elif status == 409:
                assert_error(response, 409, "INVALID_STATE_TRANSITION")
    assert not mismatches, "\n".join(
        f"{m} {t} as {r}: expected {e}, got {g}" for m, t, r, e, g in mismatches
    )
