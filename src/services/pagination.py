"""Cursor pagination: a cursor is the opaque (base64) id of the last row of the previous page; ids are
time-ordered, so "rows with a smaller id" is the next page, stable under concurrent inserts."""
from __future__ import annotations

import base64
import binascii
import string
from dataclasses import dataclass
from typing import Any

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
