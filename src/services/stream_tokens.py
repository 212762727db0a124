"""Stream tokens: short-lived tokens that may only open the event stream (`GET /api/events?token=`).
A browser's EventSource cannot send `Authorization`, and an API token in a URL ends up in access logs
and browser history; a stream token there expires within a minute, opens one stream and reads events
only. Only its SHA-256 is stored, in the database, so any API process accepts a token another one issued."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from src.db import rowcount, transaction
from src.models import StreamToken, utcnow
from src.services.tokens import digest
from src.services.views import iso

PREFIX = "gst_"


def create_stream_token(session_factory: sessionmaker[Session], *, ttl_s: float) -> dict[str, Any]:
    """A new stream token valid for `ttl_s` seconds (shown only now). Expired tokens are removed here."""
    token = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl_s)
    with transaction(session_factory) as s:
        s.execute(delete(StreamToken).where(StreamToken.expires_at < now))
        s.add(StreamToken(token_sha256=digest(token), expires_at=expires, created_at=now))
    return {"token": token, "expires_at": iso(expires), "expires_in": int(ttl_s), "scope": "events"}


def use_stream_token(session_factory: sessionmaker[Session], token: str) -> bool:
    """Whether `token` is a stream token that has not expired nor been used; using it spends it. It rides
    in a URL, which access logs, proxies and browser history keep: a copy read from there must open
    nothing. It is checked when a stream opens; the stream then lives on until EVENTS_MAX_STREAM_S, when
    the client asks for a new token."""
    if not token.startswith(PREFIX) or len(token) > 128:
        return False
    hashed = digest(token)
    with transaction(session_factory) as s:
        row = s.execute(
            select(StreamToken.token_sha256, StreamToken.expires_at).where(StreamToken.token_sha256 == hashed)
        ).first()
        if row is None or not hmac.compare_digest(row.token_sha256, hashed):
            return False
        # Deleted by whoever gets here first: of two requests racing with one token, one stream opens.
        if rowcount(s.execute(delete(StreamToken).where(StreamToken.token_sha256 == hashed))) != 1:
            return False
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=dt.timezone.utc)
    return expires > utcnow()
