"""API tokens. A token is shown once when created; only its SHA-256 is stored. Tokens from API_TOKENS
are hashed at start-up and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from src.db import transaction
from src.errors import Conflict, NotFound
from src.models import ApiToken, utcnow


def digest(token: str) -> str:
    # surrogateescape: a header with undecodable bytes is a wrong token (401), never a crash (500)
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def create_token(session_factory: sessionmaker[Session], name: str, *, replace: bool = False) -> str:
    """Create a token named `name` and return it (the only time it is visible). Conflict if the name exists,
    unless `replace`: then the old token of that name (revoked or not) is deleted in the same transaction,
    so it stops working the moment the new one exists."""
    token = "gps_" + secrets.token_urlsafe(32)
    try:
        with transaction(session_factory) as s:
            if replace:
                s.execute(delete(ApiToken).where(ApiToken.name == name))
            s.add(ApiToken(name=name, token_sha256=digest(token)))
    except IntegrityError:
        raise Conflict(f"a token named {name!r} already exists", code="token_exists") from None
    return token


def revoke_token(session_factory: sessionmaker[Session], name: str) -> None:
    with transaction(session_factory) as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
        if row is None:
            raise NotFound(f"no active token named {name!r}")
        row.revoked_at = utcnow()


def list_tokens(session_factory: sessionmaker[Session]) -> list[dict[str, str | None]]:
    with transaction(session_factory) as s:
        return [
            {
                "name": t.name,
                "created_at": t.created_at.isoformat(),
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in s.scalars(select(ApiToken).order_by(ApiToken.name))
        ]


class TokenVerifier:
    """Checks bearer tokens against API_TOKENS and the api_tokens table."""

    def __init__(self, session_factory: sessionmaker[Session], static_tokens: tuple[str, ...]) -> None:
        self._sf = session_factory
        self._static = [digest(t) for t in static_tokens]

    def verify(self, token: str) -> bool:
        if not token or len(token) > 512:
            return False
        hashed = digest(token)
        # Every static digest is compared (no early exit), so timing says nothing about which matched.
        static_match = False
        for known in self._static:
            static_match |= hmac.compare_digest(hashed, known)
        if static_match:
            return True
        # The lookup is by digest: an attacker cannot steer the digest's prefix, so an index lookup
        # leaks nothing useful about stored tokens.
        with self._sf() as s:
            row = s.scalar(
                select(ApiToken.token_sha256).where(ApiToken.token_sha256 == hashed, ApiToken.revoked_at.is_(None))
            )
        return row is not None and hmac.compare_digest(row, hashed)
