"""What a caller's scope lets it see and touch: every scope rule, once for each way the code
reaches the data (Python, the ORM, SQL text for `text()` and for the driver).

A scope (`models.scope.Scope`, made from the token by `core.auth`) restricts three
dimensions: `regions`, `models`, `orgs` (None: not restricted). Two rules:

- **A vehicle** (or any row with `region`, `model` and `org` columns: drift rows, fleet counts)
  is inside when, on each restricted dimension, its value is allowed.
- **Something that names sets of vehicles** (a rollout's targets, an audit entry's `regions`,
  `models` and `orgs`) is inside when, on each restricted dimension, it names at least one
  value and every value it names is allowed; naming nothing there is outside. A write whose
  targets are outside is refused (403).

A scoped caller learns nothing of what is outside: not its existence (out-of-scope ids answer
as absent ones), not its ids (a rollout id it cannot see is left out of an overlap and of its
own vehicles' rows), not its counts. Registering a vehicle would tell whether an id is taken
anywhere in the fleet, so a scoped caller registers none unless allowed (`check_may_register`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Text, cast, func, literal
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import col

from core.errors import Forbidden
from models.scope import Scope
from models.tables import AuditEntry, Rollout, Vehicle

# The restricted dimensions: the attribute of `Scope`, the key of a target set and the array
# column of an audit entry share the name; a vehicle's column is the singular.
DIMENSIONS = ("regions", "models", "orgs")
VEHICLE_COLUMNS = {"regions": "region", "models": "model", "orgs": "org"}


def restrictions(scope: Scope) -> list[tuple[str, tuple[str, ...]]]:
    """The restricted dimensions of `scope` and the values each allows."""
    return [(d, allowed) for d in DIMENSIONS if (allowed := getattr(scope, d)) is not None]


# --- Vehicles ----------------------------------------------------------------------------


def allows_vehicle(scope: Scope, *, region: str | None, model: str | None, org: str | None) -> bool:
    values = {"regions": region, "models": model, "orgs": org}
    return all(values[d] in allowed for d, allowed in restrictions(scope))


def vehicles_in_scope(stmt: Any, scope: Scope) -> Any:
    """An ORM statement over `Vehicle`, restricted to the vehicles inside `scope`."""
    for dimension, allowed in restrictions(scope):
        column = getattr(Vehicle, VEHICLE_COLUMNS[dimension])
        stmt = stmt.where(col(column).in_(list(allowed)))
    return stmt


def match_sql(
    column: str, name: str, values: Sequence[Any], params: dict[str, Any], *, driver: bool
) -> str:
    """` AND column = value` for one value (a `(column, id)` index then gives the rows in id
    order), ` AND column = ANY(values)` for several; the value goes into `params` under
    `name`, with SQLAlchemy's placeholder (`:name`) or, for `driver`, psycopg's."""
    placeholder = f"%({name})s" if driver else f":{name}"
    if len(values) == 1:
        params[name] = values[0]
        return f" AND {column} = {placeholder}"
    params[name] = list(values)
    return f" AND {column} = ANY({placeholder})"


def vehicle_scope_sql(
    scope: Scope, alias: str = "", *, driver: bool = False
) -> tuple[str, dict[str, Any]]:
    """` AND ...` restricting rows with region/model/org columns (of relation `alias`) to the
    vehicles inside `scope`, and its parameters (placeholders as `match_sql`'s)."""
    prefix = f"{alias}." if alias else ""
    params: dict[str, Any] = {}
    clauses = [
        match_sql(
            f"{prefix}{VEHICLE_COLUMNS[d]}", f"scope_{VEHICLE_COLUMNS[d]}", allowed, params,
            driver=driver,
        )
        for d, allowed in restrictions(scope)
    ]  # fmt: skip
    return "".join(clauses), params


# --- Sets of vehicles: rollouts and audit entries ------------------------------------------


def outside_dimensions(names: Mapping[str, Any] | None, scope: Scope) -> list[str]:
    """The restricted dimensions on which `names` (a target set, an audit entry's scope)
    names nothing, or a value the scope does not allow."""
    names = names or {}
    return [
        d
        for d, allowed in restrictions(scope)
        if not (chosen := names.get(d) or []) or not set(chosen) <= set(allowed)
    ]


def names_inside(names: Mapping[str, Any] | None, scope: Scope) -> bool:
    return not outside_dimensions(names, scope)


def check_targets_in_scope(targets: dict[str, Any], scope: Scope) -> None:
    """Refuse (403) targets that reach outside the caller's scope. An org-scoped caller that
    names no orgs targets its own (filled in here, so expansion honours it)."""
    if scope.orgs is not None and not targets.get("orgs"):
        targets["orgs"] = list(scope.orgs)
    outside = outside_dimensions(targets, scope)
    if outside:
        raise Forbidden(
            "the targets reach outside your scope",
            details=[
                {"field": f"targets.{d}", "message": "must stay inside your scope"} for d in outside
            ],
        )


REGISTRATION_NEEDS_FLEET_SCOPE = (
    "registering vehicles needs an operator without scopes: vehicle ids are one namespace"
    " for the whole fleet"
)


def check_may_register(
    vehicles: Sequence[Mapping[str, Any]], scope: Scope, *, scoped: bool
) -> None:
    """Refuse (403) a registration a scoped caller may not make. Vehicle ids are one
    namespace for the fleet, so registering one tells whether it is taken, wherever the
    vehicle is: unless `scoped` registration is allowed (`MOTORCADE_SCOPED_VEHICLE_REGISTRATION`),
    a scoped caller registers nothing, and its answer (this one) is the same whatever the
    ids, taken or free, inside or outside its scope. When allowed, each vehicle must be
    inside the scope (its region, model and org), also before any id is looked up."""
    if scope.unrestricted:
        return
    if not scoped:
        raise Forbidden(
            REGISTRATION_NEEDS_FLEET_SCOPE,
            details=[{"field": "vehicles", "message": REGISTRATION_NEEDS_FLEET_SCOPE}],
        )
    outside = [
        {"field": f"vehicles.{i}", "message": "outside the caller's scope"}
        for i, v in enumerate(vehicles)
        if not allows_vehicle(scope, region=v["region"], model=v["model"], org=v["org"])
    ]
    if outside:
        raise Forbidden("a vehicle is outside the caller's scope", details=outside)


def rollouts_in_scope(scope: Scope) -> list[Any]:
    """ORM conditions: the rollout's targets (JSONB lists) are inside `scope`."""
    conditions = []
    for dimension, allowed in restrictions(scope):
        named = col(Rollout.targets)[dimension]
        conditions.append(func.jsonb_array_length(func.coalesce(named, literal([], JSONB))) > 0)
        conditions.append(named.op("<@")(literal(list(allowed), JSONB)))
    return conditions


def rollout_scope_sql(scope: Scope, alias: str = "r") -> tuple[str, dict[str, Any]]:
    """`rollouts_in_scope` as SQL text for the driver (psycopg placeholders): ` AND ...`
    restricting rollouts `alias` to those whose targets are inside `scope`, and its
    parameters."""
    clauses, params = [], {}
    for dimension, allowed in restrictions(scope):
        name = f"rollout_scope_{dimension}"
        named = f"{alias}.targets -> '{dimension}'"
        params[name] = json.dumps(list(allowed))
        clauses.append(
            f" AND jsonb_array_length(coalesce({named}, '[]'::jsonb)) > 0"
            f" AND {named} <@ CAST(%({name})s AS jsonb)"
        )
    return "".join(clauses), params


def audit_entries_in_scope(scope: Scope) -> list[Any]:
    """ORM conditions: the audit entry's regions, models and orgs (text arrays) are inside
    `scope`; an entry about nothing scoped (a release, the fleet) is outside every scope."""
    conditions = []
    for dimension, allowed in restrictions(scope):
        named = col(getattr(AuditEntry, dimension))
        conditions.append(func.cardinality(named) > 0)
        conditions.append(named.op("<@")(cast(list(allowed), ARRAY(Text))))
    return conditions
