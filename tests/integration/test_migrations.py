"""`gpusnap db upgrade` on a fresh SQLite file and a fresh PostgreSQL database: reaches head, a second
run changes nothing, and the schema it builds is exactly `src.models` (Alembic autogenerate finds no
difference, types, indexes and unique constraints included)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner

from src.cli import main
from src.migrate import alembic_config
from src.models import Base
from tests.support.fixtures_db import scratch_postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """An empty database that has never seen a migration."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'fresh.db'}"  # the directory does not exist yet either
        return
    with scratch_postgres_database("gpusnap_mig") as url:
        yield url


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def _schema(engine: sa.Engine) -> dict[str, object]:
    """Tables with their columns, indexes and unique constraints: enough to see any change."""
    insp = sa.inspect(engine)
    out: dict[str, object] = {}
    for table in sorted(insp.get_table_names()):
        out[table] = (
            [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
            sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)),
            sorted((u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(table)),
        )
    return out


def _diffs(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        return compare_metadata(ctx, Base.metadata)


def test_db_upgrade_reaches_head_is_idempotent_and_matches_the_models(fresh_url):
    env = {"DATABASE_URL": fresh_url}
    first = CliRunner().invoke(main, ["db", "upgrade"], env=env, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    head = _head(fresh_url)
    assert first.output.strip() == f"database at revision {head}"

    engine = sa.create_engine(fresh_url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
        before = _schema(engine)
        assert set(before) == set(Base.metadata.tables) | {"alembic_version"}
        assert _diffs(engine) == []

        with engine.begin() as conn:  # data written between runs must survive the second run
            conn.execute(
                sa.text(
                    "INSERT INTO machines (id, status, created_at, updated_at) "
                    "VALUES ('keep-me', 'running', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )

        second = CliRunner().invoke(main, ["db", "upgrade"], env=env, catch_exceptions=False)
        assert second.exit_code == 0, second.output
        assert second.output.strip() == f"database at revision {head}"
        assert _schema(engine) == before
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM alembic_version")) == 1
            assert conn.scalar(sa.text("SELECT id FROM machines")) == "keep-me"
    finally:
        engine.dispose()


def test_gpusnap_db_upgrade_console_script_in_a_subprocess(tmp_path):
    """The installed command, as `make run` calls it, on a brand-new SQLite path."""
    url = f"sqlite:///{tmp_path / 'instance' / 'gpusnap.db'}"
    gpusnap = pathlib.Path(sys.executable).with_name("gpusnap")
    command = [str(gpusnap)] if gpusnap.exists() else [sys.executable, "-m", "src.cli"]
    env = {**os.environ, "DATABASE_URL": url}
    for _ in range(2):
        done = subprocess.run(
            [*command, "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"database at revision {_head(url)}"
    engine = sa.create_engine(url)
    try:
        assert _diffs(engine) == []
    finally:
        engine.dispose()
