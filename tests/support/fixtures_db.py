"""Databases for the tests: every test that takes `database_url` runs on SQLite and on PostgreSQL.

SQLite: a fresh file per test, copied from a template migrated once. PostgreSQL: a database of our own
(created and migrated once per session, dropped at the end), emptied between tests."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from src.migrate import upgrade
from tests.support.services import ensure_postgres

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("db") / "template.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


@contextmanager
def scratch_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database of our own (started if needed; skips the test loudly when
    PostgreSQL is not installed), dropped afterwards. Yields its URL."""
    reason = ensure_postgres()
    if reason:
        pytest.skip(f"POSTGRES TESTS SKIPPED: {reason}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def _postgres_database() -> Iterator[str]:
    with scratch_postgres_database("gpusnap_test") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        path = tmp_path / "gpusnap.db"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("_postgres_database")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE machines, machine_events, snapshots, jobs, api_tokens, events, stream_tokens, store_objects, store_chunks, snapshot_objects RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()
    return url


@pytest.fixture
def sqlite_url(tmp_path, _sqlite_template) -> str:  # type: ignore[no-untyped-def]
    """SQLite only, for tests whose subject is not the database."""
    path = tmp_path / "gpusnap.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"
