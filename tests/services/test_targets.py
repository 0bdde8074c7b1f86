"""Target selection: the request form (bound arrays) and the stored form (a rollout's JSONB)
select the same vehicles, orgs included. (Scope: tests/services/test_scope.py.)"""

from __future__ import annotations

import json
import secrets

import psycopg
import pytest
from sqlalchemy import create_engine, text

from core.settings import normalize_database_url
from services.targets import REQUEST_MATCH, match_params, stored_array_match, stored_arrays


@pytest.fixture(scope="module")
def fleet(database_url: str) -> str:
    prefix = f"TG{secrets.token_hex(3).upper()}-"
    rows = [
        (f"{prefix}{i}", model, region, ring, org)
        for i, (model, region, ring, org) in enumerate(
            [
                ("atlas", "eu-west", "canary", "acme"),
                ("atlas", "eu-west", "broad", "globex"),
                ("dune", "eu-west", "broad", "acme"),
                ("dune", "us-east", "canary", "acme"),
            ]
        )
    ]
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO vehicles (id, model, region, ring, org) VALUES (%s, %s, %s, %s, %s)",
            rows,
        )
    return prefix


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ({"regions": ["eu-west"]}, [0, 1, 2]),
        ({"regions": ["eu-west"], "orgs": ["acme"]}, [0, 2]),
        ({"models": ["atlas", "dune"], "rings": ["canary"]}, [0, 3]),
        ({"orgs": ["globex"]}, [1]),
        ({"vehicleIds": ["{p}3", "{p}1"], "regions": ["us-east"]}, [3]),
        ({"regions": [], "rings": None, "models": ["dune"]}, [2, 3]),
    ],
)
def test_request_and_stored_forms_agree(
    database_url: str, fleet: str, targets: dict, expected: list[int]
) -> None:
    targets = {
        k: ([v.format(p=fleet) for v in vals] if isinstance(vals, list) else vals)
        for k, vals in targets.items()
    }
    want = [f"{fleet}{i}" for i in expected]
    engine = create_engine(normalize_database_url(database_url))
    with engine.connect() as conn:
        request = conn.execute(
            text(
                f"SELECT v.id FROM vehicles v WHERE v.id LIKE :prefix AND {REQUEST_MATCH}"
                " ORDER BY v.id"
            ),
            {"prefix": fleet + "%", **match_params(targets)},
        ).fetchall()
        stored = conn.execute(
            text(
                f"WITH sel AS (SELECT {stored_arrays('r')}"
                " FROM (SELECT CAST(:targets AS jsonb) AS targets) r)"
                " SELECT v.id FROM vehicles v, sel"
                f" WHERE v.id LIKE :prefix AND {stored_array_match('sel')} ORDER BY v.id"
            ),
            {"targets": json.dumps(targets), "prefix": fleet + "%"},
        ).fetchall()
    engine.dispose()
    assert [r[0] for r in request] == want
    assert [r[0] for r in stored] == want
