"""Keyset pagination: `WHERE (sort_key, id) > (:v, :id) ORDER BY sort_key, id LIMIT n+1`.

Stable under inserts and flat with depth (no OFFSET, no COUNT). Cursors are opaque
base64url JSON naming the sort they belong to, so a cursor from another sort is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, tuple_
from sqlalchemy.sql.elements import ColumnElement

from core.errors import InvalidInput
from models.storable import storable_text

S = TypeVar("S", bound=Select[Any])

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1


def check_choices(values: Iterable[str], choices: Sequence[str], *, field: str, noun: str) -> None:
    """Refuse (422) a list filter's value that is not one of `choices` (named in that order)."""
    for value in values:
        if value not in choices:
            raise InvalidInput(
                f"unknown {noun} {value!r}",
                details=[{"field": field, "message": f"one of {[str(c) for c in choices]}"}],
            )


def check_rollout_ids(values: Iterable[str]) -> None:
    """Refuse (422) a `rolloutId` filter's value that is not a rollout id: ASCII digits
    (`str.isdigit` also takes `²` and other scripts' digits) within bigint."""
    for value in values:
        if not (
            value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= BIGINT_MAX
        ):
            raise InvalidInput(
                f"rolloutId {value!r} is not a rollout id",
                details=[{"field": "rolloutId", "message": "a positive integer"}],
            )


# What a cursor's sort value or id is: a bigint, a text (storable in PostgreSQL), an RFC 3339
# timestamp with a zone (as `isoformat` writes it), a UUID, or a timeline position (a seq at
# epoch 0, else `[epoch, seq]`; decoded as the pair). Each list names the kinds of its
# cursor's parts, and `decode_cursor` refuses anything else (422 naming `cursor`) before a
# value reaches a comparison or the database.
CursorKind = Literal["int", "text", "timestamp", "uuid", "epoch_seq"]


def _cursor_part(kind: CursorKind, raw: Any) -> Any:
    """`raw` (a cursor's JSON value) as a value of `kind`; ValueError when it is not one."""
    if kind == "epoch_seq":
        if isinstance(raw, list) and len(raw) == 2:
            return _cursor_part("int", raw[0]), _cursor_part("int", raw[1])
        return 0, _cursor_part("int", raw)
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError("not an integer")
        if not BIGINT_MIN <= raw <= BIGINT_MAX:
            raise ValueError("out of range")
        return raw
    if not isinstance(raw, str) or not storable_text(raw):
        raise ValueError("not a text")
    if kind == "text":
        return raw
    if kind == "uuid":
        return uuid.UUID(raw)
    if len(raw) > 64:
        raise ValueError("not a timestamp")
    at = datetime.fromisoformat(raw)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a timestamp without a zone")
    return at


@dataclass(frozen=True)
class SortKey:
    """One allowed sort: the API name, the column and the kind of its value in a cursor."""

    name: str
    column: Any
    kind: CursorKind = "text"

    def encode(self, value: Any) -> Any:
        return value.isoformat() if self.kind == "timestamp" else value


def timestamp_key(name: str, column: Any) -> SortKey:
    return SortKey(name, column, "timestamp")


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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a cursor value")


def decode_cursor(cursor: str, sort: Sort, *, id_kind: CursorKind) -> tuple[Any, Any]:
    """The sort value and the id a cursor of `sort` carries, each checked to be of its kind
    (the sort key's, `id_kind`); anything else, whatever it is (not base64, not JSON, NaN or
    Infinity, a float, a nested object, an integer beyond bigint, a text with U+0000, a
    timestamp without a zone, a cursor of another sort), is 422 naming `cursor`."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(
            base64.urlsafe_b64decode(padded.encode("ascii")), parse_constant=_refuse_constant
        )
        if not isinstance(data, dict) or set(data) != {"s", "v", "i"}:
            raise ValueError("not a cursor")
        if data["s"] != sort.label:
            raise ValueError("cursor from another sort")
        value = _cursor_part(sort.key.kind, data["v"])
        ident = _cursor_part(id_kind, data["i"])
        return value, ident
    except (ValueError, TypeError, binascii.Error, UnicodeError, RecursionError):
        raise InvalidInput(
            "the cursor is not valid for this list and sort",
            details=[{"field": "cursor", "message": "use nextCursor from the previous page"}],
        ) from None


def keyset(
    stmt: S, *, sort: Sort, id_column: Any, id_kind: CursorKind, cursor: str | None, limit: int
) -> S:
    """Apply the keyset condition, the order and limit+1 (one extra row says hasMore)."""
    col = sort.key.column
    if cursor:
        value, ident = decode_cursor(cursor, sort, id_kind=id_kind)
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
    sort: Sort,
    *,
    alias: str,
    id_kind: CursorKind,
    cursor: str | None,
    limit: int,
    params: dict[str, Any],
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
        value, after = decode_cursor(cursor, sort, id_kind=id_kind)
        params["after_id"] = after
        if by_id:
            condition = f" AND {ident} {cmp} %(after_id)s"
        else:
            params["after_value"] = value
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
