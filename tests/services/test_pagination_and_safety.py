"""Pure rules: cursors and the safety-policy comparison, table by table."""

from __future__ import annotations

import pytest
from sqlmodel import col

from core.errors import InvalidInput
from models.tables import Vehicle
from services.pagination import SortKey, decode_cursor, encode_cursor, parse_sort
from services.safety import SafetyDefaults, effective_safety

KEYS = (SortKey("id", col(Vehicle.id)), SortKey("status", col(Vehicle.status)))


@pytest.mark.parametrize(
    ("raw", "name", "descending"),
    [(None, "id", False), ("id", "id", False), ("-status", "status", True), ("+id", "id", False)],
)
def test_parse_sort(raw: str | None, name: str, descending: bool) -> None:
    sort = parse_sort(raw, KEYS, "id")
    assert (sort.key.name, sort.descending) == (name, descending)


def test_unknown_sort_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_sort("colour", KEYS, "id")
    assert info.value.details[0]["field"] == "sort"


def test_cursor_roundtrip_and_binding_to_its_sort() -> None:
    by_status = parse_sort("status", KEYS, "id")
    cursor = encode_cursor(by_status, "pending", "VIN-9")
    assert decode_cursor(cursor, by_status) == ("pending", "VIN-9")
    with pytest.raises(InvalidInput):
        decode_cursor(cursor, parse_sort("-status", KEYS, "id"))
    for bad in ("", "%%%", "bm90LWpzb24", "e30"):
        with pytest.raises(InvalidInput):
            decode_cursor(bad, by_status)


DEFAULTS = SafetyDefaults(require_stationary=True, min_battery_percent=30)


@pytest.mark.parametrize(
    ("stationary", "battery", "effective", "weakened"),
    [
        (None, None, (True, 30), ()),
        (True, 50, (True, 50), ()),
        (False, None, (False, 30), ("requireStationary",)),
        (None, 29, (True, 29), ("minBatteryPercent",)),
        (False, 0, (False, 0), ("requireStationary", "minBatteryPercent")),
    ],
)
def test_effective_safety(
    stationary: bool | None,
    battery: int | None,
    effective: tuple[bool, int],
    weakened: tuple[str, ...],
) -> None:
    out = effective_safety(
        defaults=DEFAULTS, require_stationary=stationary, min_battery_percent=battery
    )
    assert (out.require_stationary, out.min_battery_percent) == effective
    assert out.weakened == weakened


def test_nothing_is_weaker_than_a_lax_default() -> None:
    lax = SafetyDefaults(require_stationary=False, min_battery_percent=0)
    out = effective_safety(defaults=lax, require_stationary=False, min_battery_percent=0)
    assert out.weakened == ()
