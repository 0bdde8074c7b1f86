"""The sample fleet, seeded into databases of its own (never the shared session database)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import seed as seed_module
from devtools.seed import BASELINE_RELEASE, SAMPLE_RELEASES, seed_fleet
from services.signing import KeysFileTrustedKeys, verify_release
from tests.conftest import migrated_database

VEHICLES = 2_000

MakeDatabase = Callable[[], str]


@pytest.fixture(scope="module")
def make_database(database_server_url: str) -> Iterator[MakeDatabase]:
    """Fresh migrated databases, all dropped at the end of the module."""
    with ExitStack() as databases:
        yield lambda: databases.enter_context(migrated_database(database_server_url))


@pytest.fixture(scope="module")
def seeded(make_database: MakeDatabase, tmp_path_factory: pytest.TempPathFactory) -> dict:
    url = make_database()
    state_dir = tmp_path_factory.mktemp("state")
    result = seed_fleet(url, vehicles=VEHICLES, state_dir=state_dir, seed=7)
    return {"url": url, "state_dir": state_dir, "result": result}


def _all(url: str, query: str, params: Any = None) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def _one(url: str, query: str, params: Any = None) -> Any:
    return _all(url, query, params)[0][0]


def _attributes(url: str) -> list[tuple]:
    return _all(url, "SELECT id, model, region, ring, org, metadata FROM vehicles ORDER BY id")


def _indexes(url: str) -> set[tuple[str, str]]:
    rows = _all(
        url,
        "SELECT indexname, indexdef FROM pg_indexes"
        " WHERE tablename IN ('vehicles', 'desired_states')",
    )
    return {(name, definition) for name, definition in rows}


def test_counts_and_result(seeded: dict) -> None:
    result, url = seeded["result"], seeded["url"]
    assert not result.skipped
    assert result.vehicles_inserted == VEHICLES
    assert result.releases_inserted == len(SAMPLE_RELEASES)
    assert result.seconds > 0 and result.vehicles_per_second > 0
    assert _one(url, "SELECT count(*) FROM vehicles") == VEHICLES
    assert _one(url, "SELECT count(*) FROM desired_states") == VEHICLES
    assert _one(url, "SELECT count(*) FROM releases") == len(SAMPLE_RELEASES)
    ids = [row[0] for row in _all(url, "SELECT id FROM vehicles ORDER BY id")]
    assert ids[0] == "VIN-000001" and ids[-1] == f"VIN-{VEHICLES:06d}"


def test_every_vehicle_in_sync_on_the_oldest_release(seeded: dict) -> None:
    url = seeded["url"]
    oldest = _one(url, "SELECT version FROM releases ORDER BY created_at, version LIMIT 1")
    assert oldest == BASELINE_RELEASE
    newest = _one(url, "SELECT version FROM releases ORDER BY created_at DESC LIMIT 1")
    assert newest != oldest
    rows = _all(
        url,
        "SELECT status, desired_release_version, actual_release_version, reason_codes,"
        " count(*), min(battery_percent), max(battery_percent),"
        " bool_and(last_seen_at > now() - interval '10 minutes'), count(*) FILTER (WHERE"
        " stationary), count(DISTINCT desired_state_id), count(*) FILTER (WHERE rollout_id"
        " IS NOT NULL) FROM vehicles GROUP BY 1, 2, 3, 4",
    )
    assert len(rows) == 1
    status, desired, actual, reasons, count, low, high, recent, parked, states, rollouts = rows[0]
    assert (status, desired, actual, reasons, count) == ("in_sync", oldest, oldest, [], VEHICLES)
    assert 40 <= low and high <= 100
    assert recent
    assert parked == VEHICLES  # with battery >= 40: every vehicle passes the default checks
    assert states == VEHICLES and rollouts == 0


def test_one_desired_state_row_per_vehicle(seeded: dict) -> None:
    url = seeded["url"]
    mismatched = _one(
        url,
        "SELECT count(*) FROM vehicles v LEFT JOIN desired_states d"
        " ON d.id = v.desired_state_id AND d.vehicle_id = v.id"
        " AND d.release_version = v.desired_release_version"
        " WHERE d.id IS NULL",
    )
    assert mismatched == 0
    rows = _all(url, "SELECT DISTINCT reason, created_by, rollout_id FROM desired_states")
    assert rows == [("seed", "seed", None)]
    assert all(row[0].version == 4 for row in _all(url, "SELECT id FROM desired_states"))


def test_fleet_is_spread_over_models_regions_rings_and_orgs(seeded: dict) -> None:
    url = seeded["url"]

    def counts(column: str) -> dict[str, int]:
        return dict(_all(url, f"SELECT {column}, count(*) FROM vehicles GROUP BY 1"))

    assert len(counts("model")) >= 4
    assert len(counts("region")) >= 5
    rings = counts("ring")
    assert set(rings) == {"canary", "early", "broad"}
    assert rings["canary"] < rings["early"] < rings["broad"]
    orgs = counts("org")
    assert orgs["default"] > VEHICLES * 0.9
    metadata = _one(url, "SELECT metadata FROM vehicles WHERE id = 'VIN-000001'")
    assert set(metadata) == {"vin", "year"} and len(metadata["vin"]) == 17


def test_releases_verify_against_the_trusted_keys_file(seeded: dict) -> None:
    url, state_dir = seeded["url"], seeded["state_dir"]
    assert (state_dir / "dev-release-signing-key.pem").exists()
    trusted = KeysFileTrustedKeys(state_dir / "trusted-keys.json")
    rows = _all(
        url,
        "SELECT version, artifact_digest, components, signature, signing_key_id, created_by"
        " FROM releases ORDER BY created_at",
    )
    assert [row[0] for row in rows] == [r.version for r in SAMPLE_RELEASES]
    for version, digest, components, signature, kid, created_by in rows:
        assert created_by == "seed"
        assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
        assert {"name", "version"} <= set(components[0])
        verify_release(
            trusted,
            version=version,
            artifact_digest=digest,
            components=components,
            signature=signature,
            key_id=kid,
        )


def test_audit_entry(seeded: dict) -> None:
    rows = _all(
        seeded["url"],
        "SELECT actor, source, action, target_type, result, payload FROM audit_log"
        " WHERE action = 'fleet.seeded'",
    )
    assert len(rows) == 1
    actor, source, _action, target_type, result, payload = rows[0]
    assert (actor, source, target_type, result) == ("seed", "system", "fleet", "ok")
    assert payload["vehicles"] == VEHICLES and payload["releases"] == len(SAMPLE_RELEASES)


def test_second_call_is_skipped(seeded: dict) -> None:
    url = seeded["url"]
    again = seed_fleet(url, vehicles=VEHICLES, state_dir=seeded["state_dir"], seed=7)
    assert again.skipped and again.vehicles_inserted == 0
    assert _one(url, "SELECT count(*) FROM vehicles") == VEHICLES
    assert _one(url, "SELECT count(*) FROM audit_log WHERE action = 'fleet.seeded'") == 1


def test_same_seed_same_fleet_also_through_the_bulk_index_path(
    seeded: dict,
    make_database: MakeDatabase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second database seeded with the same seed, this time with indexes dropped and
    rebuilt (the path big seeds take): same vehicle attributes, same indexes afterwards."""
    url = make_database()
    before = _indexes(url)
    monkeypatch.setattr(seed_module, "DEFER_INDEXES_FROM", 1)
    # A SQLAlchemy-style URL is accepted too.
    result = seed_fleet(
        url.replace("postgresql://", "postgresql+psycopg://", 1),
        vehicles=VEHICLES,
        state_dir=tmp_path,
        seed=7,
    )
    assert not result.skipped and result.vehicles_inserted == VEHICLES
    assert _indexes(url) == before
    assert _attributes(url) == _attributes(seeded["url"])
    other = make_database()
    seed_fleet(other, vehicles=VEHICLES, state_dir=tmp_path, seed=8)
    assert _attributes(other) != _attributes(url)
