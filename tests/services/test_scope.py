"""The scope rules of services/scope.py, table by table, and the SQL forms agreeing with the
Python ones over real rows."""

from __future__ import annotations

import secrets

import psycopg
import pytest

from core.errors import Forbidden
from models.scope import Scope
from services.scope import (
    allows_vehicle,
    check_targets_in_scope,
    names_inside,
    outside_dimensions,
    vehicle_scope_sql,
)

EU = Scope(regions=("eu-west",))
ACME_EU = Scope(regions=("eu-west",), orgs=("acme",))


@pytest.mark.parametrize(
    ("scope", "vehicle", "inside"),
    [
        (Scope(), ("us-east", "atlas", None), True),
        (EU, ("eu-west", "atlas", None), True),
        (EU, ("us-east", "atlas", "acme"), False),
        (EU, (None, "atlas", "acme"), False),  # an unknown region is outside a regional scope
        (ACME_EU, ("eu-west", "dune", "acme"), True),
        (ACME_EU, ("eu-west", "dune", "globex"), False),
        (Scope(models=("atlas", "dune")), ("ap-south", "dune", None), True),
    ],
)
def test_a_vehicle_is_inside_when_each_restricted_dimension_allows_it(
    scope: Scope, vehicle: tuple[str | None, str | None, str | None], inside: bool
) -> None:
    region, model, org = vehicle
    assert allows_vehicle(scope, region=region, model=model, org=org) is inside


@pytest.mark.parametrize(
    ("scope", "names", "outside"),
    [
        (Scope(), {}, []),
        (EU, {"regions": ["eu-west"]}, []),
        (EU, {"regions": ["eu-west", "us-east"]}, ["regions"]),  # one value outside: outside
        (EU, {"models": ["atlas"]}, ["regions"]),  # names no region: outside a regional scope
        (EU, None, ["regions"]),
        (ACME_EU, {"regions": ["eu-west"], "orgs": []}, ["orgs"]),
        (ACME_EU, {"regions": ["us-east"], "orgs": ["globex"]}, ["regions", "orgs"]),
    ],
)
def test_a_target_set_is_inside_when_it_names_only_allowed_values(
    scope: Scope, names: dict | None, outside: list[str]
) -> None:
    assert outside_dimensions(names, scope) == outside
    assert names_inside(names, scope) is (not outside)


def test_org_scoped_targets_are_bound_to_the_callers_orgs() -> None:
    targets: dict = {"regions": ["eu-west"], "orgs": []}
    check_targets_in_scope(targets, Scope(orgs=("acme",)))
    assert targets["orgs"] == ["acme"]
    with pytest.raises(Forbidden):
        check_targets_in_scope({"regions": ["eu-west"], "orgs": ["globex"]}, Scope(orgs=("acme",)))
    with pytest.raises(Forbidden) as refused:
        check_targets_in_scope({"models": ["atlas"]}, Scope(regions=("eu-west",)))
    assert refused.value.details == [
        {"field": "targets.regions", "message": "must stay inside your scope"}
    ]


@pytest.mark.parametrize(
    "scope",
    [Scope(), EU, ACME_EU, Scope(models=("atlas", "dune")), Scope(regions=("eu-west", "us-east"))],
)
def test_the_sql_form_selects_what_the_python_rule_allows(database_url: str, scope: Scope) -> None:
    prefix = f"SC{secrets.token_hex(3).upper()}-"
    fleet = [
        ("eu-west", "atlas", "acme"),
        ("eu-west", "dune", "globex"),
        ("us-east", "dune", "acme"),
        ("ap-south", "atlas", "initech"),
    ]
    where, params = vehicle_scope_sql(scope, "v", driver=True)
    with psycopg.connect(database_url) as conn:
        conn.cursor().executemany(
            "INSERT INTO vehicles (id, region, model, ring, org) VALUES (%s, %s, %s, 'ga', %s)",
            [(f"{prefix}{i}", *v) for i, v in enumerate(fleet)],
        )
        rows = conn.execute(
            f"SELECT v.id FROM vehicles v WHERE v.id LIKE %(prefix)s{where} ORDER BY v.id",
            {"prefix": prefix + "%", **params},
        ).fetchall()
        conn.rollback()
    allowed = [
        f"{prefix}{i}"
        for i, (region, model, org) in enumerate(fleet)
        if allows_vehicle(scope, region=region, model=model, org=org)
    ]
    assert [r[0] for r in rows] == allowed
