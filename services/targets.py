"""A rollout's (or a direct desired state's) target selection, as SQL over `vehicles v`.

Targets select by `models`, `regions`, `rings`, `orgs` and `vehicleIds`; the lists AND
together, and an absent, null or empty list does not filter on its dimension. Every writer
and reader of target sets (expansion, dry run, overlap, direct desired states) uses these
fragments, so they cannot disagree about which vehicles a target set means.
"""

from __future__ import annotations

from typing import Any

TARGET_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("models", "v.model"),
    ("regions", "v.region"),
    ("rings", "v.ring"),
    ("orgs", "v.org"),
    ("vehicleIds", "v.id"),
)


def _name(key: str) -> str:
    return "t_" + key.lower()


# Targets given as bound text arrays (see match_params).
REQUEST_MATCH = " AND ".join(
    f"(cardinality(CAST(:{_name(key)} AS text[])) = 0"
    f" OR {column} = ANY(CAST(:{_name(key)} AS text[])))"
    for key, column in TARGET_DIMENSIONS
)


def match_params(targets: dict[str, Any]) -> dict[str, list[str]]:
    """The bound parameters of REQUEST_MATCH for a target set (camelCase keys, as stored)."""
    return {_name(key): [str(v) for v in targets.get(key) or []] for key, _ in TARGET_DIMENSIONS}


def _stored_array(key: str, rollout: str) -> str:
    return (
        f"ARRAY(SELECT jsonb_array_elements_text(CASE WHEN jsonb_typeof({rollout}.targets ->"
        f" '{key}') = 'array' THEN {rollout}.targets -> '{key}' END))"
    )


def stored_arrays(rollout: str = "r") -> str:
    """SELECT-list items: a stored rollout's target lists as text arrays `t_models`, ...
    (computed once per rollout rather than once per vehicle)."""
    return ",\n".join(
        f"{_stored_array(key, rollout)} AS {_name(key)}" for key, _ in TARGET_DIMENSIONS
    )


def stored_array_match(alias: str = "a") -> str:
    """Vehicles selected by the arrays of `stored_arrays`, read from relation `alias`."""
    return " AND ".join(
        f"(cardinality({alias}.{_name(key)}) = 0 OR {column} = ANY({alias}.{_name(key)}))"
        for key, column in TARGET_DIMENSIONS
    )
