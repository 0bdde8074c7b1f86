"""A client generated from docs/openapi.yaml, as a dashboard team would generate one, works
against the running app: `openapi-python-client` (PyPI) writes it here, in the test, and the
test reads vehicles page by page with its cursor, dry-runs a rollout and reads an error's
code, through the generated types and method names only."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.api.test_releases_and_rollouts import rollout_body
from tests.factories import insert_signed_release, insert_vehicles

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
PACKAGE = "motorcade_generated_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ModuleType]]:
    """The generated package, importable; `generated("api.vehicles.list_vehicles")`."""
    out = tmp_path_factory.mktemp("client")
    tool = Path(sys.executable).parent / "openapi-python-client"
    run = subprocess.run(
        [tool, "generate", "--path", SPEC, "--meta", "none", "--output-path", out / PACKAGE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Every operation and schema made it: the only warning allowed is the NDJSON export,
    # a stream of lines the generator has no type for.
    said = run.stdout + run.stderr
    warnings = [line for line in said.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING parsing GET /api/v1/audit-log/export within audit."], said
    sys.path.insert(0, str(out))
    try:
        yield lambda name: importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
            del sys.modules[name]


def client_for(generated: Callable[[str], ModuleType], base_url: str, token: str) -> Any:
    return generated("client").AuthenticatedClient(base_url=base_url, token=token)


async def test_a_generated_client_pages_vehicles_with_the_cursor(
    generated: Callable[[str], ModuleType],
    api_base_url: str,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
) -> None:
    ids = [f"{prefix}{i:02d}" for i in range(7)]
    insert_vehicles(database_url, ids)
    list_vehicles = generated("api.vehicles.list_vehicles")
    vehicle_page = generated("models.vehicle_page").VehiclePage
    async with client_for(generated, api_base_url, token("viewer")) as client:
        seen: list[str] = []
        cursor: Any = None
        pages = 0
        while True:
            kwargs = {"cursor": cursor} if cursor else {}
            page = await list_vehicles.asyncio(client=client, q=prefix, limit=3, **kwargs)
            assert isinstance(page, vehicle_page), page
            seen += [vehicle.id for vehicle in page.data]
            pages += 1
            if not page.metadata.has_more:
                assert page.metadata.next_cursor is None
                break
            cursor = page.metadata.next_cursor
    assert seen == ids and pages == 3


async def test_a_generated_client_dry_runs_a_rollout_and_reads_an_error_code(
    generated: Callable[[str], ModuleType],
    api_base_url: str,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    release = f"{prefix}2026.12.0"
    insert_signed_release(database_url, signing_key, release)
    insert_vehicles(database_url, [f"{prefix}{i}" for i in range(10)])
    create_rollout = generated("api.rollouts.create_rollout")
    rollout_create = generated("models.rollout_create").RolloutCreate
    plan_response = generated("models.rollout_plan_response").RolloutPlanResponse
    error = generated("models.error").Error
    body = rollout_body(release, targets={"vehicleIds": [f"{prefix}{i}" for i in range(10)]})
    async with client_for(generated, api_base_url, token("operator")) as client:
        planned = await create_rollout.asyncio(
            client=client, body=rollout_create.from_dict(body), dry_run=True
        )
        assert isinstance(planned, plan_response), planned
        assert planned.data.targeted == 10
        assert [stage.vehicles for stage in planned.data.stages] == [1, 4, 5]

        refused = await create_rollout.asyncio(
            client=client, body=rollout_create.from_dict({**body, "releaseVersion": "nope"})
        )
        assert isinstance(refused, error), refused
        assert refused.error.code.value == "VALIDATION_ERROR"
        assert refused.metadata.request_id

    async with client_for(generated, api_base_url, token("viewer")) as viewer:
        forbidden = await create_rollout.asyncio(client=viewer, body=rollout_create.from_dict(body))
        assert isinstance(forbidden, error) and forbidden.error.code.value == "FORBIDDEN"


async def test_a_generated_client_reads_a_rollout_typed(
    generated: Callable[[str], ModuleType],
    api_base_url: str,
    token: Callable[..., str],
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
) -> None:
    """A created rollout read back through the client: its strategy, targets and gates are
    the generated types, not dicts, and the list finds it by release."""
    release = f"{prefix}2026.12.2"
    insert_signed_release(database_url, signing_key, release)
    vehicles = [f"{prefix}r{i}" for i in range(4)]
    insert_vehicles(database_url, vehicles)
    create_rollout = generated("api.rollouts.create_rollout")
    get_rollout = generated("api.rollouts.get_rollout")
    list_rollouts = generated("api.rollouts.list_rollouts")
    rollout_create = generated("models.rollout_create").RolloutCreate
    strategy_type = generated("models.strategy").Strategy
    body = rollout_body(release, targets={"vehicleIds": vehicles})
    async with client_for(generated, api_base_url, token("operator")) as client:
        created = await create_rollout.asyncio(client=client, body=rollout_create.from_dict(body))
        rid = created.data.id
        try:
            shown = (await get_rollout.asyncio(client=client, rollout_id=rid)).data
            assert isinstance(shown.strategy, strategy_type)
            assert shown.strategy.canary.size == 1
            assert [wave.percent for wave in shown.strategy.waves] == [50, 100]
            assert shown.targets.vehicle_ids == vehicles
            assert shown.gates.safety_checks.min_battery_percent == 30
            assert shown.progress.targeted in (0, 4)  # 4 once its workflow has expanded it
            listed = await list_rollouts.asyncio(client=client, release_version=[release])
            assert [r.id for r in listed.data] == [rid]
        finally:
            with psycopg.connect(database_url) as conn:  # hold no vehicle for later tests
                conn.execute("UPDATE rollouts SET status = 'aborted' WHERE id = %s", (rid,))
