"""Text PostgreSQL can store: no NUL character (U+0000; text and jsonb refuse it) and no lone
surrogate (U+D800 to U+DFFF alone: JSON's `\\ud800` escape decodes to one, and it has no UTF-8
encoding, so the driver cannot send it). A client's text that is not storable is refused with
a 422 naming its field before it reaches a statement, where it would be a 500 (or, in a group
commit, fail its neighbours).

One rule for every way text comes in: `storable_text` for one string, `unstorable_path` for a
JSON value (keys included), `StorableStr` for a model field, and `check_storable_json` for a
model validator over any field (`models.api.StrictCamelModel` checks every field of every
request body with it; query and path parameters are checked by `api.deps`). A JSON value is
also refused for a number jsonb cannot hold: Infinity or NaN (Python's JSON parser reads
`1e999` as infinity and takes the `NaN` and `Infinity` literals).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "must not contain U+0000 (NUL) or a lone surrogate (U+D800 to U+DFFF)"
NON_FINITE_MESSAGE = "must be a finite number (JSON has no Infinity or NaN)"


def storable_text(value: str) -> bool:
    """Whether PostgreSQL can store `value` as text or inside jsonb."""
    return UNSTORABLE.search(value) is None


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """Where and why PostgreSQL cannot store a JSON value: the dotted path (`""` for `value`
    itself) of the first string with U+0000 or a lone surrogate (a bad key gives the path of
    its object) or non-finite number, and the message; None when it can store all of it.
    Walks without recursion, so no nesting depth can make it fail."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not storable_text(item):
                return where, UNSTORABLE_MESSAGE
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where, NON_FINITE_MESSAGE
        elif isinstance(item, Mapping):
            for key, inner in reversed(list(item.items())):
                if isinstance(key, str) and not storable_text(key):
                    return where, UNSTORABLE_MESSAGE
                stack.append((f"{where}.{key}" if where else str(key), inner))
        elif isinstance(item, list | tuple):
            for index in range(len(item) - 1, -1, -1):
                stack.append((f"{where}.{index}" if where else str(index), item[index]))
    return None


def unstorable_path(value: Any) -> str | None:
    """The path of `unstorable`, or None."""
    found = unstorable(value)
    return None if found is None else found[0]


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
    if not storable_text(value):
        raise ValueError(UNSTORABLE_MESSAGE)
    return value


StorableStr = Annotated[str, AfterValidator(_storable)]
"""A string field PostgreSQL can store (422 naming the field otherwise)."""
