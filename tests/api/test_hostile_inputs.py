"""Bad input from a client is a 4xx in the error envelope naming the field, never a 500, on
the real app over real PostgreSQL: forged cursors on every list, U+0000 and lone surrogates
in query parameters, path parameters and JSON bodies, and times that are not ISO-8601 with a
zone."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.test_envelopes import assert_error
from tests.factories import insert_vehicles


def forged(text: str) -> str:
    """A cursor the way the API writes them (base64url of JSON), with any JSON text inside."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def assert_names(response: httpx.Response, field: str, status: int = 422) -> dict[str, Any]:
    """A 422 whose details name `field` (a body of either of two shapes, one vehicle or a
    batch, names it under the shape's model: `VehicleIn.ring`)."""
    body = assert_error(response, status, "VALIDATION_ERROR")
    named = [d["field"] for d in body["error"]["details"]]
    assert any(f == field or f.endswith("." + field) for f in named), body
    return body


# Each list with a cursor: its URL, a valid cursor's sort label, value and id (JSON text) and
# the kinds of the value and the id.
LISTS = [
    ("/api/v1/vehicles?sort=id", "id", '"V1"', '"V1"', "text", "text"),
    ("/api/v1/vehicles?sort=lastSeenAt", "lastSeenAt", '"2026-01-01T00:00:00+00:00"', '"V1"',
     "timestamp", "text"),
    ("/api/v1/vehicles?sort=-status", "-status", '"in_sync"', '"V1"', "text", "text"),
    ("/api/v1/vehicles/{vehicle}/timeline", "-seq", "5", f'"{uuid.uuid4()}"', "epoch_seq",
     "uuid"),
    ("/api/v1/rollouts?sort=-id", "-id", "3", "3", "int", "int"),
    ("/api/v1/rollouts?sort=createdAt", "createdAt", '"2026-01-01T00:00:00+00:00"', "3",
     "timestamp", "int"),
    ("/api/v1/rollouts?sort=status", "status", '"running"', "3", "text", "int"),
    ("/api/v1/rollouts/{rollout}/vehicles", "vehicleId", '"V1"', '"V1"', "text", "text"),
    ("/api/v1/releases", "-createdAt", '"2026-01-01T00:00:00+00:00"', '"1.0.0"', "timestamp",
     "text"),
    ("/api/v1/releases?sort=version", "version", '"1.0.0"', '"1.0.0"', "text", "text"),
    ("/api/v1/desired-states", "-createdAt", '"2026-01-01T00:00:00+00:00"',
     f'"{uuid.uuid4()}"', "timestamp", "uuid"),
    ("/api/v1/audit-log", "-at", '"2026-01-01T00:00:00+00:00"', "7", "timestamp", "int"),
]  # fmt: skip

# JSON values no cursor part may be: not finite, not an integer, beyond bigint, nested, a NUL
# or a lone surrogate; then what each kind refuses besides.
NOT_ANY = [
    "Infinity",
    "-Infinity",
    "NaN",
    "1e999",
    "1.5",
    "true",
    "null",
    '{"v": 1}',
    "[1, 2]",
    '"a\\u0000b"',
    '"\\ud800"',
]
NOT_TEXT = [*NOT_ANY, "12", str(2**63), "9" * 5000]
BAD = {
    "int": [*NOT_ANY, str(2**63), str(-(2**63) - 1), "9" * 5000, '"12"', '"x"'],
    "text": NOT_TEXT,
    "timestamp": [*NOT_TEXT, '"2026-01-01T00:00:00"', '"2026-01-01"', '"yesterday"'],
    "uuid": [*NOT_TEXT, '"not-a-uuid"', '"12"'],
}
# A timeline position: a seq, or [epoch, seq] past epoch 0 (each part an int).
BAD["epoch_seq"] = [
    *(b for b in BAD["int"] if b != "[1, 2]"),
    "[1]",
    "[1, 2, 3]",
    "[1.5, 2]",
    "[1, Infinity]",
    f"[{2**63}, 1]",
    '["1", 2]',
]


EXTREMES = {
    "int": [str(-(2**63)), str(2**63 - 1), "0"],
    "text": ['""', '"\\u00e9\\ud83d\\ude00"', '"' + "x" * 500 + '"'],
    "timestamp": ['"0001-01-01T00:00:00+14:00"', '"9999-12-31T23:59:59.999999-14:00"'],
    "uuid": ['"00000000-0000-0000-0000-000000000000"', '"ffffffff-ffff-ffff-ffff-ffffffffffff"'],
    "epoch_seq": [str(2**63 - 1), "0", f"[{2**63 - 1}, {2**63 - 1}]", "[1, 2]"],
}


def _cursors(label: str, value: str, ident: str, kinds: tuple[str, str]) -> list[str]:
    out = [f'{{"s": "{label}", "v": {bad}, "i": {ident}}}' for bad in BAD[kinds[0]]]
    out += [f'{{"s": "{label}", "v": {value}, "i": {bad}}}' for bad in BAD[kinds[1]]]
    out += [
        f'{{"s": "{label}", "v": {value}}}',
        f'{{"s": "{label}", "v": {value}, "i": {ident}, "x": 1}}',
        f'{{"s": "other", "v": {value}, "i": {ident}}}',
        f'[{{"s": "{label}", "v": {value}, "i": {ident}}}]',
        "[" * 900 + "]" * 900,
        '"just a string"',
    ]
    return [forged(text) for text in out]


@pytest.mark.parametrize(("url", "label", "value", "ident", "value_kind", "id_kind"), LISTS)
async def test_a_forged_cursor_is_422_naming_cursor_on_every_list(
    http: httpx.AsyncClient,
    viewer: dict,
    database_url: str,
    prefix: str,
    url: str,
    label: str,
    value: str,
    ident: str,
    value_kind: str,
    id_kind: str,
) -> None:
    insert_vehicles(database_url, [f"{prefix}V"])
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO rollouts (release_version, targets, strategy, status, created_by)"
            " VALUES ('1.0', '{}', %s, 'aborted', 'test') RETURNING id",
            (json.dumps({"waves": [{"percent": 100, "bakeSeconds": 0}]}),),
        ).fetchone()
    assert row is not None
    url = url.format(vehicle=f"{prefix}V", rollout=row[0])
    sep = "&" if "?" in url else "?"
    good = forged(f'{{"s": "{label}", "v": {value}, "i": {ident}}}')
    accepted = await http.get(f"{url}{sep}cursor={good}", headers=viewer)
    assert accepted.status_code == 200, accepted.text  # the shape the list writes is taken
    for kind, part in ((value_kind, "v"), (id_kind, "i")):
        for extreme in EXTREMES[kind]:  # the edges of each kind are valid cursors too
            parts = {"v": value, "i": ident, part: extreme}
            cursor = forged(f'{{"s": "{label}", "v": {parts["v"]}, "i": {parts["i"]}}}')
            response = await http.get(f"{url}{sep}cursor={cursor}", headers=viewer)
            assert response.status_code == 200, (extreme, response.text)
    raw_bytes = base64.urlsafe_b64encode(bytes(range(256))[:90]).decode().rstrip("=")
    for cursor in [*_cursors(label, value, ident, (value_kind, id_kind)), raw_bytes, "%%%", "e30"]:
        response = await http.get(f"{url}{sep}cursor={cursor}", headers=viewer)
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))[:80]
        assert response.status_code == 422, (text, response.text)
        assert_names(response, "cursor")


NUL_QUERIES = [
    ("/api/v1/audit-log", {"action": "rollout.\x00created"}, "action"),
    ("/api/v1/audit-log", {"targetId": "\x00"}, "targetId"),
    ("/api/v1/audit-log/export", {"actor": "a\x00"}, "actor"),
    ("/api/v1/vehicles", {"q": "V\x00"}, "q"),
    ("/api/v1/vehicles", {"region": "eu\x00"}, "region"),
    ("/api/v1/vehicles", {"sort": "id\x00"}, "sort"),
    ("/api/v1/vehicles", {"releaseVersion": "1\x00"}, "releaseVersion"),
    ("/api/v1/rollouts", {"releaseVersion": "1\x00"}, "releaseVersion"),
    ("/api/v1/desired-states", {"releaseVersion": "\x00"}, "releaseVersion"),
    ("/api/v1/releases", {"cursor": "\x00"}, "cursor"),
]


@pytest.mark.parametrize(("url", "params", "field"), NUL_QUERIES)
async def test_nul_in_a_query_parameter_is_422_naming_it(
    http: httpx.AsyncClient, viewer: dict, url: str, params: dict, field: str
) -> None:
    assert_names(await http.get(url, params=params, headers=viewer), field)


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/vehicles/V%00X", "vehicle_id"),
        ("/api/v1/vehicles/V%00X/timeline", "vehicle_id"),
        ("/api/v1/releases/1.0%00", "version"),
    ],
)
async def test_nul_in_a_path_parameter_is_422_naming_it(
    http: httpx.AsyncClient, viewer: dict, url: str, field: str
) -> None:
    assert_names(await http.get(url, headers=viewer), field)


def _raw(body: str) -> dict[str, Any]:
    """`content=` for a JSON text that json.dumps could not write (a lone surrogate escape)."""
    return {"content": body.encode(), "headers": {"Content-Type": "application/json"}}


def _vehicle(vid: str, **fields: Any) -> dict[str, Any]:
    return {"id": vid, "model": "atlas", "region": "eu-west", "ring": "broad", **fields}


async def test_unstorable_text_in_a_body_is_422_naming_the_field_and_nothing_is_stored(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str
) -> None:
    vid = f"{prefix}B"
    cases: list[tuple[str, dict[str, Any], str, str | None]] = [
        ("/api/v1/vehicles", {"json": _vehicle(vid, ring="b\x00")}, "ring", None),
        (
            "/api/v1/vehicles",
            {"json": _vehicle(vid, metadata={"a": {"b": [1, "x\x00"]}})},
            "metadata",
            "a.b.1",
        ),
        ("/api/v1/vehicles", {"json": _vehicle(vid, metadata={"k\x00": 1})}, "metadata", None),
        (
            "/api/v1/vehicles",
            _raw(
                json.dumps(_vehicle(vid, metadata={"s": "SURROGATE"})).replace(
                    "SURROGATE", "\\ud800"
                )
            ),
            "metadata",
            "s",
        ),
        (
            "/api/v1/vehicles",
            {"json": {"vehicles": [_vehicle(vid), _vehicle(vid + "2", org="o\x00")]}},
            "vehicles.1.org",
            None,
        ),
        ("/api/v1/rollouts/1/pause", {"json": {"reason": "why\x00"}}, "reason", None),
        ("/api/v1/rollouts/1/abort", _raw('{"reason": "\\udfff"}'), "reason", None),
        (
            "/api/v1/rollouts",
            {"json": {"releaseVersion": "1.0\x00", "targets": {"regions": ["eu-west"]}}},
            "releaseVersion",
            None,
        ),
        (
            "/api/v1/rollouts",
            {
                "json": {
                    "releaseVersion": "1.0",
                    "targets": {"regions": ["eu-west\x00"]},
                    "reason": "r",
                }
            },
            "targets.regions",
            None,
        ),
        (
            "/api/v1/desired-states",
            {
                "json": {
                    "releaseVersion": "1.0",
                    "targets": {"vehicleIds": [vid]},
                    "reason": "\x00",
                }
            },
            "reason",
            None,
        ),
        (
            "/api/v1/releases",
            {
                "json": {
                    "version": "9.9.9",
                    "components": [{"name": "ecu\x00", "version": "1"}],
                    "artifactDigest": "sha256:" + "ab" * 32,
                    "signature": "c2ln",
                    "signingKeyId": "k",
                }
            },
            "components.0.name",
            None,
        ),
    ]
    for url, kwargs, field, inner in cases:
        headers = {**operator, **kwargs.pop("headers", {})}
        response = await http.post(url, headers=headers, **kwargs)
        body = assert_names(response, field)
        if inner:
            assert any(inner in d["message"] for d in body["error"]["details"]), body
        assert "\x00" not in response.text and "\\u0000" not in response.text
    listed = await http.get(f"/api/v1/vehicles?q={prefix}", headers=operator)
    assert listed.json()["data"] == []


@pytest.mark.parametrize(
    "value",
    ["0.5", "1700000000", "-1", "2026-01-10", "2026-01-10T12:00:00", "1e9", "now", "", "NaN"],
)
async def test_audit_log_times_are_iso_8601_with_a_zone_only(
    http: httpx.AsyncClient, viewer: dict, value: str
) -> None:
    for name in ("from", "to"):
        for path in ("/api/v1/audit-log", "/api/v1/audit-log/export"):
            assert_names(await http.get(path, params={name: value}, headers=viewer), name)


async def test_audit_log_takes_zoned_iso_8601_times(http: httpx.AsyncClient, viewer: dict) -> None:
    for value in ("2026-01-10T12:00:00Z", "2026-01-10T13:00:00+01:00", "2026-01-10T12:00:00.5Z"):
        response = await http.get("/api/v1/audit-log", params={"to": value}, headers=viewer)
        assert response.status_code == 200, response.text


async def test_nul_in_the_path_of_a_keyed_post_is_422(
    http: httpx.AsyncClient, operator: dict, prefix: str
) -> None:
    """The idempotency middleware records a keyed POST's path before any route runs: a NUL
    there is refused, not sent to PostgreSQL."""
    headers = {**operator, "Idempotency-Key": f"{prefix}nul-path"}
    for url in ("/api/v1/rollouts/1%00/pause", "/api/v1/vehicles%00"):
        response = await http.post(url, headers=headers, json={"reason": "r"})
        assert response.status_code in (404, 422), response.text
        assert_error(response, response.status_code, response.json()["error"]["code"])


async def test_nul_in_any_parameter_of_any_operation_is_never_a_500(
    http: httpx.AsyncClient, operator: dict
) -> None:
    """Every operation the API describes, each of its query and path parameters in turn set
    to a text with U+0000 (the others left out or set to `1`): a 4xx in the envelope, never
    a 500 (the stream is left out: it answers with events, not a body)."""
    spec = (await http.get("/openapi.json", headers=operator)).json()
    tried = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.endswith("/stream") or method not in ("get", "post"):
                continue
            params = op.get("parameters", [])
            for target in [p for p in params if p["in"] in ("query", "path")]:
                url = path
                query = {}
                for p in params:
                    value = "a\x00b" if p is target else "1"
                    if p["in"] == "path":
                        url = url.replace("{" + p["name"] + "}", value.replace("\x00", "%00"))
                    elif p is target:
                        query[p["name"]] = value
                response = await http.request(
                    method.upper(), url, params=query, headers=operator, json={}
                )
                tried += 1
                assert 400 <= response.status_code < 500, (method, url, query, response.text)
                assert_error(response, response.status_code, response.json()["error"]["code"])
    assert tried >= 20


async def test_a_refusal_never_echoes_a_nul_and_is_replayed_under_its_key(
    http: httpx.AsyncClient, operator: dict, prefix: str
) -> None:
    """An unknown body field whose name holds U+0000 is named in the 422 with U+FFFD in its
    place: the answer is text PostgreSQL can store, so its Idempotency-Key records it and
    a retry gets the same answer (not IDEMPOTENCY_KEY_IN_USE)."""
    headers = {**operator, "Idempotency-Key": f"{prefix}nul-field"}
    body = {**_vehicle(f"{prefix}K"), "colo\x00r": "red"}
    first = await http.post("/api/v1/vehicles", headers=headers, json=body)
    assert_names(first, "colo\ufffdr")
    assert "\\u0000" not in first.text
    again = await http.post("/api/v1/vehicles", headers=headers, json=body)
    assert again.status_code == 422, again.text
    assert again.json()["error"] == first.json()["error"]


@pytest.mark.parametrize("value", ["²", "٣", "9" * 30, "9" * 5000, str(2**63), "0x10", "-1", "1.0"])
async def test_a_rollout_id_filter_is_a_bigint_in_ascii_digits(
    http: httpx.AsyncClient, viewer: dict, value: str
) -> None:
    """`rolloutId` (vehicles, desired states): `str.isdigit` takes `²` and any length; the
    filter takes ASCII digits within bigint only, else 422 naming it (was a 500)."""
    for url in ("/api/v1/vehicles", "/api/v1/desired-states"):
        response = await http.get(url, params={"rolloutId": value}, headers=viewer)
        assert_names(response, "rolloutId")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"x": 1e999}', "metadata"),
        ('{"x": -Infinity}', "metadata"),
        ('{"x": [NaN]}', "metadata"),
        ('{"x": ' + "9" * 5000 + "}", "body"),
        ("[" * 5000 + "]" * 5000, "body"),
        ('{"a": ' * 3000 + "1" + "}" * 3000, "body"),
    ],
)
async def test_json_numbers_and_nesting_no_database_can_take_are_422(
    http: httpx.AsyncClient, operator: dict, database_url: str, prefix: str, raw: str, field: str
) -> None:
    """`metadata` is free JSON, but only JSON PostgreSQL's jsonb takes: no Infinity or NaN
    (Python's parser reads `1e999` as infinity), no integer past the parser's limit, no
    nesting past its depth. Each is a 422, and nothing is stored."""
    vid = f"{prefix}J"
    body = json.dumps(_vehicle(vid, metadata={"m": "RAW"})).replace('"RAW"', raw)
    kwargs = _raw(body)
    headers = {**operator, **kwargs.pop("headers")}
    response = await http.post("/api/v1/vehicles", headers=headers, **kwargs)
    assert_names(response, field)
    listed = await http.get(f"/api/v1/vehicles?q={prefix}", headers=operator)
    assert listed.json()["data"] == []
