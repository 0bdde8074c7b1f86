"""What PostgreSQL can store, checked before anything is written: one value it refuses inside
a group commit would otherwise fail the transaction of every request merged with it.

- Text (`text` columns, jsonb strings and keys) holds no NUL character (U+0000) and no lone
  surrogate (U+D800 to U+DFFF, what a JSON `\\ud800` escape without its pair decodes to):
  `text_problem` says which, for any string; typed fields carry `StorableText`, whose pattern
  refuses NUL (a lone surrogate never reaches a typed field: pydantic's JSON parser refuses it,
  and so does its string check in Python mode).
- jsonb numbers are finite: no NaN, no Infinity, and no float beyond ±1.8e308 (which the
  JSON parser reads as infinity). Integers need no bound here: the JSON parser refuses those
  over 4,300 digits, jsonb holds 131,072.
- Timestamps fall within years 1 to 9999 in UTC (`StorableTime`, checked by pydantic with
  their offset): PostgreSQL would store `0001-01-01T00:30:00+01:00` (1 BC in UTC), but no
  reader could load it back, and the vehicle's rows and timeline would fail every read.

`json_problems` walks a JSON value (keys included) and names each place that breaks a rule.

One module for every way a client's text comes in: telemetry's models use `StorableText`,
`json_problems` and `storable_flat` (its hot path); every other request body is checked by
`models.api.StrictCamelModel` with `check_storable_json`, a field by `StorableStr`, and query
and path parameters by `api.deps` with `storable_text`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field

NUL_REFUSED = "must not contain the NUL character (U+0000)"
SURROGATE_REFUSED = "must not contain a lone surrogate (U+D800 to U+DFFF)"
NOT_FINITE = "must be a finite number (not NaN, Infinity or beyond ±1.8e308)"
UNSTORABLE_MESSAGE = "must not contain U+0000 (NUL) or a lone surrogate (U+D800 to U+DFFF)"

STORABLE_TEXT_PATTERN = r"^[^\x00]*$"
StorableText = Annotated[str, Field(pattern=STORABLE_TEXT_PATTERN)]

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# A place in a JSON value: its keys and list indexes from the root.
Path = tuple[str | int, ...]


def storable_text(value: str) -> bool:
    """Whether PostgreSQL can store `value` as text or inside jsonb."""
    return UNSTORABLE.search(value) is None


def text_problem(value: str) -> str | None:
    """Why PostgreSQL cannot store this string (in `text` or jsonb), or None when it can."""
    found = UNSTORABLE.search(value)
    if found is None:
        return None
    return NUL_REFUSED if found.group() == "\x00" else SURROGATE_REFUSED


def storable_flat(value: dict[str, Any]) -> bool:
    """The fast path for the common `details`: True when an object holds only storable keys and
    scalars (False when it holds a nested value or anything `json_problems` would name)."""
    search = UNSTORABLE.search
    for key, item in value.items():
        if search(key) is not None:
            return False
        kind = type(item)
        if kind is str:
            if search(item) is not None:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif kind is not int and kind is not bool and item is not None:
            return False
    return True


def json_problems(value: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """Each place in a JSON value that jsonb cannot store, and why, in document order. A bad
    key is named by the object holding it (the key itself is what cannot be shown)."""
    stack: list[tuple[Path, Any]] = [(path, value)]
    while stack:  # not recursive: a value built in Python may nest deeper than the stack
        where, item = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                yield where, problem
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield where, NOT_FINITE
        elif isinstance(item, dict):
            children: list[tuple[Path, Any]] = []
            for key, child in item.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    yield where, f"a key {problem}"
                else:
                    children.append(((*where, key), child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([((*where, i), child) for i, child in enumerate(item)]))


StorableTime = Annotated[
    AwareDatetime,
    Field(
        ge=datetime(1, 1, 1, tzinfo=UTC),
        le=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ),
]


def _dotted(path: Path) -> str:
    return ".".join(str(part) for part in path)


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first place (a dotted path, `""` for `value` itself, prefixed by `path`) where
    PostgreSQL cannot store a JSON value, and why; None when it can store all of it."""
    for where, problem in json_problems(value):
        dotted = _dotted(where)
        return (f"{path}.{dotted}" if path and dotted else path or dotted), problem
    return None


def check_storable_json(value: Any) -> Any:
    """`value` unchanged, or ValueError naming where inside it, and why, PostgreSQL could
    not store it (a nested model was checked already by its own validators)."""
    if isinstance(value, BaseModel):
        return value
    found = unstorable(value)
    if found is None:
        return value
    where, message = found
    raise ValueError(f"{where}: {message}" if where else message)


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


StorableStr = Annotated[str, AfterValidator(_storable)]
"""A string field PostgreSQL can store (422 naming the field otherwise)."""
