"""Keyset pagination: `WHERE (sort_key, id) > (:v, :id) ORDER BY sort_key, id LIMIT n+1`.

Stable under inserts and flat with depth (no OFFSET, no COUNT). Cursors are opaque
base64url JSON naming the sort they belong to, so a cursor from another sort is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.sql.elements import ColumnElement

from core.errors import InvalidInput

S = TypeVar("S", bound=Select[Any])

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def check_choices(values: Iterable[str], choices: Sequence[str], *, field: str, noun: str) -> None:
    """Refuse (422) a list filter's value that is not one of `choices` (named in that order)."""
    for value in values:
        if value not in choices:
            raise InvalidInput(
                f"unknown {noun} {value!r}",
                details=[{"field": field, "message": f"one of {[str(c) for c in choices]}"}],
            )


def check_rollout_ids(values: Iterable[str]) -> None:
    """Refuse (422) a `rolloutId` filter's value that is not a rollout id."""
    for value in values:
        if not value.isdigit():
            raise InvalidInput(
                f"rolloutId {value!r} is not a rollout id",
                details=[{"field": "rolloutId", "message": "a positive integer"}],
            )


@dataclass(frozen=True)
class SortKey:
    """One allowed sort: the API name, the column and how to put its value in a cursor."""

    name: str
    column: Any
    encode: Callable[[Any], Any] = lambda v: v
    decode: Callable[[Any], Any] = lambda v: v


def timestamp_key(name: str, column: Any) -> SortKey:
    def enc(v: datetime) -> str:
        return v.isoformat()

    def dec(v: str) -> datetime:
        return datetime.fromisoformat(v)

    return SortKey(name, column, enc, dec)


@dataclass(frozen=True)
class Sort:
    key: SortKey
    descending: bool

    @property
    def label(self) -> str:
        return ("-" if self.descending else "") + self.key.name


def parse_sort(raw: str | None, keys: Sequence[SortKey], default: str) -> Sort:
    text = (raw or default).strip()
    descending = text.startswith("-")
    name = text.lstrip("-+")
    for key in keys:
        if key.name == name:
            return Sort(key, descending)
    allowed = ", ".join(k.name for k in keys)
    raise InvalidInput(
        f"cannot sort by {name!r}; use one of {allowed} (prefix - for descending)",
        details=[{"field": "sort", "message": f"one of {allowed}, optionally prefixed by -"}],
    )


def encode_cursor(sort: Sort, value: Any, ident: Any) -> str:
    raw = json.dumps({"s": sort.label, "v": sort.key.encode(value), "i": ident}, default=str)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: Sort) -> tuple[Any, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(data, dict) or data.get("s") != sort.label:
            raise ValueError("cursor from another sort")
        return sort.key.decode(data["v"]), data["i"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(
            "the cursor is not valid for this list and sort",
            details=[{"field": "cursor", "message": "use nextCursor from the previous page"}],
        ) from None


def keyset(stmt: S, *, sort: Sort, id_column: Any, cursor: str | None, limit: int) -> S:
    """Apply the keyset condition, the order and limit+1 (one extra row says hasMore)."""
    col = sort.key.column
    if cursor:
        value, ident = decode_cursor(cursor, sort)
        if sort.key.column is id_column:
            cond: ColumnElement[bool] = id_column < ident if sort.descending else id_column > ident
        elif sort.descending:
            cond = tuple_(col, id_column) < tuple_(value, ident)
        else:
            cond = tuple_(col, id_column) > tuple_(value, ident)
        stmt = stmt.where(cond)
    if sort.key.column is id_column:
        order = [id_column.desc() if sort.descending else id_column.asc()]
    elif sort.descending:
        order = [col.desc(), id_column.desc()]
    else:
        order = [col.asc(), id_column.asc()]
    return stmt.order_by(*order).limit(limit + 1)


def keyset_sql(
    sort: Sort, *, alias: str, cursor: str | None, limit: int, params: dict[str, Any]
) -> str:
    """`keyset` for a statement written in SQL (psycopg placeholders) over a table with an `id`
    column under `alias`: the keyset condition (` AND ...`), the order and limit+1; the values
    go into `params`. The sort's column is a text or timestamp column of that table."""
    ident = f"{alias}.id"
    column = f"{alias}.{sort.key.column.name}"
    by_id = sort.key.column.name == "id"
    cmp, direction = ("<", " DESC") if sort.descending else (">", "")
    condition = ""
    if cursor:
        value, after = decode_cursor(cursor, sort)
        params["after_id"] = str(after)
        if by_id:
            condition = f" AND {ident} {cmp} %(after_id)s"
        else:
            params["after_value"] = value if isinstance(value, datetime) else str(value)
            condition = f" AND ({column}, {ident}) {cmp} (%(after_value)s, %(after_id)s)"
    params["limit"] = limit + 1
    order = f"{ident}{direction}" if by_id else f"{column}{direction}, {ident}{direction}"
    return f"{condition} ORDER BY {order} LIMIT %(limit)s"


def split_page(
    rows: Sequence[Any],
    *,
    sort: Sort,
    limit: int,
    value_of: Callable[[Any], Any],
    id_of: Callable[[Any], Any],
) -> tuple[list[Any], str | None]:
    """Trim the extra row and build nextCursor from the last row kept."""
    items = list(rows[:limit])
    if len(rows) <= limit or not items:
        return items, None
    last = items[-1]
    return items, encode_cursor(sort, value_of(last), id_of(last))


def where_any_of(stmt: S, *filters: tuple[Any, Sequence[Any]]) -> S:
    """`stmt` narrowed by each `(column, values)` filter that has values: `column = value` for
    one (an index on the column then gives rows in its order), `column IN (...)` for more."""
    for column, values in filters:
        if values:
            cond = column.in_(list(values)) if len(values) > 1 else column == values[0]
            stmt = stmt.where(cond)
    return stmt
