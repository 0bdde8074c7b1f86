"""The README's first rollout under `make dev`'s stack, with its simulated fleet, end to end.

`motorcade dev` (tests/devtools/test_dev_stack.py's helpers: free ports, a database of its
own) seeds 100 vehicles, about a fifth of them in eu-west, and runs the simulator with
options from MOTORCADE_DEV_SIMULATE_ARGS: quick vehicles (poll every second, apply in about a
second), none failing, low on battery, moving or offline unless said, a fixed seed (so the same
canary vehicles fail in every run). The rollout is the README's own request, read from
README.md (eu-west, release 2026.11.0, canary 5, waves 50% and 100%), and read back only
through the API (`GET /rollouts/{id}` and `GET /rollouts/{id}/vehicles`).

- Every vehicle applies: the rollout completes with every targeted vehicle accounted for
  (succeeded, failed or blocked; none still notified or updating). The bakes are shortened
  from 60 s to 2 s: a stage settles (every issued vehicle has an outcome) before it bakes, so
  a short bake still judges outcomes, not the clock.
- With `--release-failure-rate 2026.11.0=0.5`: the failure threshold (default 5%) pauses the
  rollout, `FAILURE_THRESHOLD`, while it is still in its canary: no wave vehicle is notified.
  The README's 60 s canary bake is kept: the threshold is event-driven, so the pause does
  not wait for the bake.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.devtools.test_dev_stack import (
    DevPorts,
    dev_tokens,
    start_motorcade_dev,
    stop_motorcade_dev,
)

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
VEHICLES = 100
QUICK_FLEET = (
    "--poll-seconds 1 --apply-seconds 1 --heartbeat-seconds 5 --failure-rate 0"
    " --network-loss-rate 0 --low-battery-rate 0 --moving-rate 0 --offline-rate 0 --seed 18"
)
OUTCOMES = {"succeeded", "failed", "blocked"}
FINISHED = {"completed", "paused", "rolled_back", "aborted", "failed"}


def readme_rollout() -> dict[str, Any]:
    """The body of the README's `POST /rollouts` (the `-d '...'` of its curl)."""
    found = re.search(r"/api/v1/rollouts -d '(\{.*?\})'", README.read_text(), re.DOTALL)
    assert found, "README.md has no `POST /api/v1/rollouts -d '{...}'` example"
    return dict(json.loads(found.group(1)))


@dataclass
class Api:
    """The stack's API with the viewer and operator tokens it printed."""

    client: httpx.Client
    viewer: dict[str, str]
    operator: dict[str, str]

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/rollouts/{rollout_id}", headers=self.viewer)
        assert r.status_code == 200, r.text
        return dict(r.json()["data"])

    def rollout_vehicles(self, rollout_id: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
            r = self.client.get(
                f"/api/v1/rollouts/{rollout_id}/vehicles", headers=self.viewer, params=params
            )
            assert r.status_code == 200, r.text
            items += r.json()["data"]
            cursor = r.json()["metadata"]["nextCursor"]
            if not cursor:
                return items

    def wait_until_heartbeats_seen(self, region: str, within: float = 60) -> None:
        """Until every vehicle of `region` reports parked (its seeded row may say moving): the
        server judges safety on the last heartbeat, so the rollout starts on the simulator's."""
        deadline = time.monotonic() + within
        while True:
            r = self.client.get(
                "/api/v1/vehicles", headers=self.viewer, params={"region": region, "limit": 500}
            )
            assert r.status_code == 200, r.text
            moving = [v["id"] for v in r.json()["data"] if v["stationary"] is not True]
            if not moving:
                return
            assert time.monotonic() < deadline, f"no heartbeat said parked for {moving}"
            time.sleep(0.5)

    def wait_for_end(self, rollout_id: int, within: float) -> dict[str, Any]:
        """The rollout once it completed or stopped (paused, failed, ...), or as it is after
        `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            rollout = self.rollout(rollout_id)
            if rollout["status"] in FINISHED or time.monotonic() > deadline:
                return rollout
            time.sleep(0.5)


@contextmanager
def dev_stack(database_url: str, state_dir: Path, simulate_args: str) -> Iterator[Api]:
    """`motorcade dev` with VEHICLES vehicles and these simulator options, until the end."""
    ports = DevPorts()
    env = ports.environment(database_url, MOTORCADE_DEV_SIMULATE_ARGS=simulate_args)
    stack = start_motorcade_dev(env, state_dir, vehicles=VEHICLES)
    try:
        assert stack.ready.wait(180), "motorcade dev did not come up:\n" + "".join(
            stack.lines[-40:]
        )
        assert simulate_args.split()[0] in "".join(stack.lines), "simulator options not passed"
        viewer, operator = dev_tokens(stack)
        with httpx.Client(base_url=f"http://127.0.0.1:{ports.api}", timeout=30) as client:
            yield Api(client, _bearer(viewer), _bearer(operator))
    finally:
        stop_motorcade_dev(stack)
    assert stack.proc.returncode == 0, "".join(stack.lines[-30:])


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start_rollout(api: Api, body: dict[str, Any]) -> int:
    api.wait_until_heartbeats_seen(body["targets"]["regions"][0])
    created = api.client.post("/api/v1/rollouts", headers=api.operator, json=body)
    assert created.status_code == 201, created.text
    return int(created.json()["data"]["id"])


def states_by_stage(vehicles: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for v in vehicles:
        out.setdefault(v["stage"], Counter())[v["state"]] += 1
    return out


def test_the_readme_rollout_completes_with_every_vehicle_accounted_for(
    dev_database: str, tmp_path: Path
) -> None:
    body = readme_rollout()
    body["strategy"]["canary"]["bakeSeconds"] = 2
    for wave in body["strategy"]["waves"]:
        wave["bakeSeconds"] = min(wave["bakeSeconds"], 2)
    with dev_stack(dev_database, tmp_path, QUICK_FLEET) as api:
        rollout_id = start_rollout(api, body)
        rollout = api.wait_for_end(rollout_id, within=90)
        vehicles = api.rollout_vehicles(rollout_id)
    progress = rollout["progress"]
    seen = f"{rollout['status']} {rollout['statusReason']} at {rollout['stage']}: {progress};"
    seen += f" vehicles by stage and state {states_by_stage(vehicles)}"
    assert rollout["status"] == "completed", seen
    assert progress["targeted"] == len(vehicles) > 5, seen
    assert (
        progress["targeted"] == progress["succeeded"] + progress["failed"] + progress["blocked"]
    ), seen
    assert progress["updating"] == 0 and progress["pending"] == 0, seen
    assert {v["state"] for v in vehicles} <= OUTCOMES, seen
    # No vehicle failed or was blocked here: each one is running the release.
    assert {(v["state"], v["vehicleStatus"]) for v in vehicles} == {("succeeded", "in_sync")}, seen


def test_a_failing_release_pauses_the_readme_rollout_in_its_canary(
    dev_database: str, tmp_path: Path
) -> None:
    body = readme_rollout()
    release = body["releaseVersion"]
    args = f"--release-failure-rate {release}=0.5 {QUICK_FLEET}"
    with dev_stack(dev_database, tmp_path, args) as api:
        rollout_id = start_rollout(api, body)
        rollout = api.wait_for_end(rollout_id, within=75)
        vehicles = api.rollout_vehicles(rollout_id)
    by_stage = states_by_stage(vehicles)
    seen = f"{rollout['status']} {rollout['statusReason']} at {rollout['stage']}:"
    seen += f" {rollout['progress']}; vehicles by stage and state {by_stage}"
    assert (rollout["status"], rollout["statusReason"]) == ("paused", "FAILURE_THRESHOLD"), seen
    assert rollout["stage"] == "canary", seen
    assert by_stage["canary"]["failed"] >= 1, seen
    waves = [v for v in vehicles if v["stage"] != "canary"]
    assert waves and {(v["state"], v["notifiedAt"]) for v in waves} == {("planned", None)}, seen
