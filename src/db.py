"""Engine and transaction helpers. Nothing connects at import: `create_app` calls `make_engine`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str) -> Engine:
    """An engine for `database_url`. SQLite gets WAL and a busy timeout so that the API and the worker
    (separate processes) can write to one file without 'database is locked' errors."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1].split("?", 1)[0] if "///" in database_url else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            prepare_private_file(path)
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def prepare_private_file(path: str) -> None:
    """Create a SQLite file (and its directory) readable by this user only: it holds token digests, job
    parameters and host keys, and the Huey queue file holds pickled task payloads. The directory is made
    0700 when we create it; the file is created 0600 before SQLite opens it (SQLite gives its -wal, -shm
    and -journal files the mode of the database file), and a file left group/world-readable by an older
    version is narrowed to 0600, with its -wal/-shm."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    for candidate in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            if os.stat(candidate).st_mode & 0o077:
                os.chmod(candidate, 0o600)
        except FileNotFoundError:
            continue


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: services return plain data built after commit without reloading.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commits when the block ends normally, rolls back on any exception."""
    session = session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. `Session.execute` is typed as returning a plain `Result`; for
    those statements it is a `CursorResult`, which carries the count."""
    return cast(CursorResult[Any], result).rowcount
