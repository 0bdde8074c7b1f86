"""The fault tests' cluster (`Cluster`, a database of the test's own and a Temporal dev server
of its own) and what they share: a signed release, a fleet, a rollout, the vehicles' answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.auth import generate_dev_key
from models.enums import Role
from services.signing import generate_signing_key, write_trusted_keys_file
from tests.conftest import migrated_database
from tests.factories import insert_signed_release, insert_vehicles
from tests.faults.cluster import Cluster, wait_until

SIGNING_KEY = generate_signing_key()
RELEASE = "2026.20.0"
TERMINAL = {"completed", "aborted", "rolled_back", "failed"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, database_server_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    """A cluster on a fresh migrated database and a Temporal dev server of its own (started);
    the test adds and starts its Motorcade processes. Everything is stopped at the end, and
    when the test failed the tail of every process's log is printed."""
    keys = tmp_path / "trusted-keys.json"
    write_trusted_keys_file(keys, [SIGNING_KEY.public_key()])
    with migrated_database(database_server_url) as url:
        c = Cluster(
            tmp=tmp_path, database_url=url, dev_key=generate_dev_key(), trusted_keys_file=keys
        )
        try:
            c.start_temporal()
            yield c
        finally:
            c.close()
            failed = getattr(request.node, "report_call", None)
            if failed is not None and failed.failed:
                print(c.logs())


def signed_release(cluster: Cluster, version: str = RELEASE) -> str:
    insert_signed_release(cluster.database_url, SIGNING_KEY, version)
    return version


def fleet(cluster: Cluster, prefix: str, count: int, region: str) -> list[str]:
    """`count` vehicles `{prefix}000000`... in `region`, in sync on an older release, with a
    fresh passing heartbeat; their ids (sorted)."""
    ids = [f"{prefix}{i:06d}" for i in range(count)]
    insert_vehicles(cluster.database_url, ids, region=region, release="2026.1.0")
    return ids


def rollout_body(
    region: str,
    *,
    release: str = RELEASE,
    canary: int = 10,
    canary_bake: int = 1,
    waves: list[dict[str, Any]] | None = None,
    name: str = "fault test",
) -> dict[str, Any]:
    return {
        "name": name,
        "releaseVersion": release,
        "targets": {"regions": [region]},
        "strategy": {
            "canary": {"size": canary, "bakeSeconds": canary_bake},
            "waves": waves or [{"percent": 100, "bakeSeconds": 1}],
        },
    }


def create_rollout(
    http: httpx.Client, cluster: Cluster, body: dict[str, Any], **headers: str
) -> httpx.Response:
    return http.post(
        "/api/v1/rollouts",
        json=body,
        headers={**cluster.token(Role.OPERATOR, "fault-operator"), **headers},
    )


def rollout(http: httpx.Client, cluster: Cluster, rollout_id: int) -> dict[str, Any]:
    r = http.get(f"/api/v1/rollouts/{rollout_id}", headers=cluster.token(Role.VIEWER))
    assert r.status_code == 200, r.text
    return dict(r.json()["data"])


class Vehicles:
    """The test acting as the fleet: through one gateway token, a `ready` event for every
    vehicle a rollout notified and that has not answered yet (by its rollout target's desired
    state), in batches of 1,000 (the most one POST /telemetry takes)."""

    def __init__(self, cluster: Cluster, http: httpx.Client) -> None:
        self.cluster = cluster
        self.http = http
        self.headers = cluster.token(Role.GATEWAY, "fault-gateway")
        self.answered: set[tuple[str, str]] = set()  # (vehicle, desired state)
        self.posts: dict[int, int] = {}  # status code -> POSTs
        self.seqs: dict[str, int] = {}

    def _next_seq(self, vehicle_id: str) -> int:
        self.seqs[vehicle_id] = self.seqs.get(vehicle_id, 0) + 1
        return self.seqs[vehicle_id]

    def unanswered(self, rollout_id: int) -> list[tuple[str, str]]:
        """The rollout's notified targets not answered yet, in vehicle id order."""
        rows = self.cluster.sql(
            "SELECT t.vehicle_id, t.desired_state_id::text FROM rollout_targets t"
            " WHERE t.rollout_id = %s AND t.state = 'notified' ORDER BY t.vehicle_id",
            (rollout_id,),
        )
        return [(vid, ds) for vid, ds in rows if (vid, ds) not in self.answered]

    def answer(self, rollout_id: int) -> int:
        """`ready` for each newly notified target of the rollout; how many were sent."""
        todo = self.unanswered(rollout_id)
        for start in range(0, len(todo), 1000):
            self._post(todo[start : start + 1000])
        return len(todo)

    def _post(self, chunk: list[tuple[str, str]]) -> None:
        """One POST /telemetry: a `ready` for each (vehicle, desired state)."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        events = [
            {
                "eventId": str(uuid.uuid4()),
                "vehicleId": vid,
                "seq": self._next_seq(vid),
                "type": "ready",
                "occurredAt": now,
                "desiredStateId": ds,
                "releaseVersion": RELEASE,
            }
            for vid, ds in chunk
        ]
        r = self.http.post("/api/v1/telemetry", json={"events": events}, headers=self.headers)
        self.posts[r.status_code] = self.posts.get(r.status_code, 0) + 1
        assert r.status_code == 202, r.text
        self.answered.update(chunk)

    def until_finished(
        self, rollout_id: int, api: httpx.Client, *, within: float
    ) -> dict[str, Any]:
        """Answer for the notified vehicles until the rollout reaches a terminal status; the
        rollout as it then is."""

        def finished() -> dict[str, Any] | None:
            self.answer(rollout_id)
            current = rollout(api, self.cluster, rollout_id)
            return current if current["status"] in TERMINAL else None

        return dict(
            wait_until(finished, within=within, every=0.5, what=f"rollout {rollout_id} ends")
        )
