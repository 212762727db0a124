"""Cursor pagination: a cursor is the opaque (base64) id of the last row of the previous page; ids are
time-ordered, so "rows with a smaller id" is the next page, stable under concurrent inserts."""

from __future__ import annotations

import base64
import binascii
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from src.db import transaction
from src.errors import InvalidRequest

# Every character an id may hold: generated ids (`job_…`) and machine ids (`10.1.2.3:22`, `gpu-a`).
_ID_CHARS = frozenset(string.ascii_letters + string.digits + "_.:-")
MAX_ID_LENGTH = 128


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor") from None
    if not raw or len(raw) > MAX_ID_LENGTH or not set(raw) <= _ID_CHARS:
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor")
    return raw


def fetch_page(
    session_factory: sessionmaker[Session],
    query: Select[Any],
    *,
    id_column: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
    view: Callable[[Session, Any], dict[str, Any]],
    newest_first: bool = True,
) -> Page:
    """Run `query` (already filtered) for one page ordered by `id_column`, after `cursor`, and build
    each item with `view(session, row)` inside the same transaction."""
    query = query.order_by(id_column.desc() if newest_first else id_column).limit(limit + 1)
    if cursor:
        after = decode_cursor(cursor)
        query = query.where(id_column < after if newest_first else id_column > after)
    with transaction(session_factory) as s:
        rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        items = [view(s, row) for row in rows]
    return Page(items=items, next_cursor=encode_cursor(getattr(rows[-1], id_column.key)) if more else None)
