"""Keyset pagination's pure rules: sorts, cursors bound to their sort, filter values."""

from __future__ import annotations

import pytest
from sqlmodel import col

from core.errors import InvalidInput
from models.enums import RolloutStatus
from models.tables import Vehicle
from services.pagination import (
    SortKey,
    check_choices,
    check_rollout_ids,
    decode_cursor,
    encode_cursor,
    parse_sort,
)

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


def test_filter_values_are_one_of_their_choices() -> None:
    check_choices(["running", "paused"], sorted(RolloutStatus), field="status", noun="status")
    with pytest.raises(InvalidInput) as info:
        check_choices(["exploded"], sorted(RolloutStatus), field="status", noun="status")
    assert info.value.message == "unknown status 'exploded'"
    assert info.value.details == [
        {
            "field": "status",
            "message": "one of ['aborted', 'completed', 'failed', 'paused', 'pending',"
            " 'rolled_back', 'rolling_back', 'running']",
        }
    ]
    check_rollout_ids(["1", "42"])
    with pytest.raises(InvalidInput, match="'4x' is not a rollout id"):
        check_rollout_ids(["1", "4x"])
