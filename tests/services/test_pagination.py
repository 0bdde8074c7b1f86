"""Keyset pagination's pure rules: sorts, cursors bound to their sort and checked part by
part, filter values."""

from __future__ import annotations

import base64
import json
import random
import uuid
from datetime import UTC, datetime

import pytest
from sqlmodel import col

from core.errors import InvalidInput
from models.enums import RolloutStatus
from models.tables import Vehicle
from services.pagination import (
    CursorKind,
    Sort,
    SortKey,
    check_choices,
    check_rollout_ids,
    decode_cursor,
    encode_cursor,
    parse_sort,
    timestamp_key,
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
    assert decode_cursor(cursor, by_status, id_kind="text") == ("pending", "VIN-9")
    with pytest.raises(InvalidInput):
        decode_cursor(cursor, parse_sort("-status", KEYS, "id"), id_kind="text")
    for bad in ("", "%%%", "bm90LWpzb24", "e30"):
        with pytest.raises(InvalidInput):
            decode_cursor(bad, by_status, id_kind="text")


TYPED = Sort(SortKey("seq", col(Vehicle.id), "int"), descending=True)
AT = Sort(timestamp_key("at", col(Vehicle.id)), descending=False)


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def _refused(cursor: str, sort: Sort, id_kind: CursorKind) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_cursor(cursor, sort, id_kind=id_kind)
    assert info.value.details == [
        {"field": "cursor", "message": "use nextCursor from the previous page"}
    ]


def test_each_kind_round_trips_typed() -> None:
    ident = uuid.uuid4()
    assert decode_cursor(encode_cursor(TYPED, 2**63 - 1, str(ident)), TYPED, id_kind="uuid") == (
        2**63 - 1,
        ident,
    )
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert decode_cursor(encode_cursor(AT, at, -5), AT, id_kind="int") == (at, -5)


@pytest.mark.parametrize(
    "part",
    [
        "Infinity", "-Infinity", "NaN", "1e999", "-1e999", "1.0", "0.5", str(2**63),
        str(-(2**63) - 1), "9" * 4000, "true", "false", "null", "{}", '{"a": {"b": 1}}',
        "[]", "[5]", '"5"', '"a\\u0000"', '"\\udc00"',
    ],
)  # fmt: skip
def test_an_int_part_is_a_bigint_and_nothing_else(part: str) -> None:
    good = f'"{uuid.uuid4()}"'
    _refused(_raw(f'{{"s": "-seq", "v": {part}, "i": {good}}}'), TYPED, "uuid")
    _refused(_raw(f'{{"s": "at", "v": "2026-01-01T00:00:00Z", "i": {part}}}'), AT, "int")


@pytest.mark.parametrize(
    "part",
    [
        '"2026-01-01T00:00:00"', '"2026-01-01"', '"0.5"', "1700000000", "0.5", '"now"',
        '"2026-13-01T00:00:00Z"', '"2026-01-01T00:00:00\\u0000Z"', f'"{"2" * 100}"', "null",
    ],
)  # fmt: skip
def test_a_timestamp_part_is_iso_8601_with_a_zone(part: str) -> None:
    _refused(_raw(f'{{"s": "at", "v": {part}, "i": 1}}'), AT, "int")


@pytest.mark.parametrize("part", ['"x\\u0000"', '"\\ud83d"', "1", "1.5", "[]", "{}", "null"])
def test_a_text_or_uuid_part_is_a_storable_string(part: str) -> None:
    by_id = parse_sort("id", KEYS, "id")
    _refused(_raw(f'{{"s": "id", "v": {part}, "i": "V"}}'), by_id, "text")
    _refused(_raw(f'{{"s": "id", "v": "V", "i": {part}}}'), by_id, "text")
    _refused(_raw(f'{{"s": "-seq", "v": 1, "i": {part}}}'), TYPED, "uuid")
    _refused(_raw('{"s": "-seq", "v": 1, "i": "not-a-uuid"}'), TYPED, "uuid")


def test_random_cursors_are_refused_never_raised() -> None:
    """Random bytes, random base64 and random JSON shapes: a 422 or a typed pair, never
    another exception."""
    rng = random.Random(19)
    shapes = [
        lambda: rng.randbytes(rng.randint(0, 300)),
        lambda: json.dumps(
            {"s": "-seq", "v": float(f"{rng.random()}e{rng.randint(0, 400)}"), "i": "x"}
        ).encode(),
        lambda: ("[" * rng.randint(1, 5000)).encode(),
        lambda: ('{"s": "-seq", "v": ' * rng.randint(1, 2000)).encode(),
        lambda: json.dumps(
            {"s": "-seq", "v": rng.randint(-(2**70), 2**70), "i": str(uuid.uuid4())}
        ).encode(),
    ]
    for _ in range(2000):
        raw = rng.choice(shapes)()
        for cursor in (base64.urlsafe_b64encode(raw).decode(), raw.decode("latin-1")):
            try:
                value, ident = decode_cursor(cursor, TYPED, id_kind="uuid")
            except InvalidInput:
                continue
            assert isinstance(value, int) and -(2**63) <= value < 2**63
            assert isinstance(ident, uuid.UUID)


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


POSITION = Sort(SortKey("seq", col(Vehicle.id), "epoch_seq"), descending=True)


def test_a_timeline_position_is_a_seq_or_an_epoch_and_a_seq() -> None:
    ident = uuid.uuid4()
    seq_only = encode_cursor(POSITION, 7, str(ident))
    assert decode_cursor(seq_only, POSITION, id_kind="uuid") == ((0, 7), ident)
    pair = encode_cursor(POSITION, [1700000000, 3], str(ident))
    assert decode_cursor(pair, POSITION, id_kind="uuid") == ((1700000000, 3), ident)


@pytest.mark.parametrize(
    "part",
    ["[1]", "[1, 2, 3]", "[1.5, 2]", "[1, Infinity]", f"[{2**63}, 1]", '["1", 2]', "[true, 1]",
     "[[1], 2]", "1.5", '"5"', "null"],
)  # fmt: skip
def test_a_timeline_position_refuses_anything_else(part: str) -> None:
    _refused(_raw(f'{{"s": "-seq", "v": {part}, "i": "{uuid.uuid4()}"}}'), POSITION, "uuid")
