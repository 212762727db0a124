"""Server-side commands: migrations, tokens, the job worker, and `serve` (API and worker together)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError, SQLAlchemyError

from src.cli.common import CliFailure
from src.errors import GpusnapError
from src.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration (idempotent)."""
    from src.migrate import current_revision, upgrade

    url = _database_url()
    with _database_errors(url):
        upgrade(url)
        click.echo(f"database at revision {current_revision(url)}")


@click.group()
def tokens() -> None:
    """API tokens (stored as SHA-256 only)."""


def _database_url() -> str:
    try:
        return Settings.from_env().database_url
    except GpusnapError as e:  # a malformed setting: say which, no traceback
        raise CliFailure(e.code, e.message) from None


def _absolute_local_paths(url: str) -> dict[str, str]:
    """DATABASE_URL and QUEUE_PATH with relative SQLite file paths made absolute against this directory."""
    paths: dict[str, str] = {}
    parsed = make_url(url)
    if (
        parsed.drivername.startswith("sqlite")
        and parsed.database not in (None, "", ":memory:")
        and not os.path.isabs(parsed.database)
    ):
        paths["DATABASE_URL"] = parsed.set(database=os.path.abspath(parsed.database)).render_as_string(
            hide_password=False
        )
    settings = Settings.from_env()
    if not settings.redis_url and not os.path.isabs(settings.queue_path):
        paths["QUEUE_PATH"] = os.path.abspath(settings.queue_path)
    return paths


def redacted(url: str) -> str:
    """DATABASE_URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say nothing of its content
        return "DATABASE_URL"


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """Database failures as one line a person can act on (`error: <code>: <message>`, exit 1)."""
    try:
        yield
    except GpusnapError as e:
        raise CliFailure(e.code, e.message) from None
    except (OperationalError, ProgrammingError) as e:
        text = str(e.orig if getattr(e, "orig", None) is not None else e).strip().splitlines()[0]
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            raise CliFailure(
                "not_migrated", f"the database {redacted(url)} has no schema yet: run `gpusnap db upgrade` first"
            ) from None
        raise CliFailure(
            "database_unavailable", f"the database {redacted(url)} failed: {text} (check DATABASE_URL)"
        ) from None
    except (SQLAlchemyError, ArgumentError, AlembicError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CliFailure(
            "database_unavailable", f"the database {redacted(url)} failed: {text} (check DATABASE_URL)"
        ) from None


def _require_migrated(url: str) -> None:
    """Admin commands need the schema this version expects; they never create it behind the operator's
    back (on a shared PostgreSQL that is a deliberate step): they say to run `gpusnap db upgrade`."""
    from alembic.script import ScriptDirectory

    from src.migrate import alembic_config, current_revision

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    current = current_revision(url)
    if current is None:
        raise CliFailure(
            "not_migrated", f"the database {redacted(url)} has no schema yet: run `gpusnap db upgrade` first"
        )
    if current not in heads:
        raise CliFailure(
            "not_migrated",
            f"the database {redacted(url)} is at revision {current}, this "
            f"version needs {', '.join(sorted(heads))}: run `gpusnap db upgrade` first",
        )


@contextmanager
def _sessions() -> Iterator[Any]:
    """A session factory on DATABASE_URL for one command, after checking the schema is current; its engine
    is disposed afterwards. A domain error (a duplicate name, an unknown token) or a database failure ends
    the command with one line, `error: <code>: <message>`, and exit status 1."""
    from src.db import make_engine, make_session_factory

    url = _database_url()
    with _database_errors(url):
        _require_migrated(url)
        engine = make_engine(url)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()


@tokens.command("create")
@click.argument("name")
@click.option(
    "--replace", is_flag=True, help="If a token called NAME exists, delete it (it stops working) and make a new one"
)
def tokens_create(name: str, replace: bool) -> None:
    """Create a token called NAME and print it (the only time it is shown)."""
    from src.services.tokens import create_token

    try:
        with _sessions() as sessions:
            token = create_token(sessions, name, replace=replace)
    except CliFailure as e:
        if e.code == "token_exists":
            e.message += " (pass --replace to make a new one in its place, or choose another name)"  # type: ignore[misc]
        raise
    click.echo(token)


@tokens.command("ls")
def tokens_ls() -> None:
    """List tokens (names and dates; the tokens themselves are not stored)."""
    from src.services.tokens import list_tokens

    with _sessions() as sessions:
        rows = list_tokens(sessions)
    for t in rows:
        click.echo(
            f"{t['name']}\tcreated {t['created_at']}" + (f"\trevoked {t['revoked_at']}" if t["revoked_at"] else "")
        )


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke the token called NAME."""
    from src.services.tokens import revoke_token

    with _sessions() as sessions:
        revoke_token(sessions, name)
    click.echo(f"revoked {name}")


@click.command()
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Jobs run at once (default WORKER_THREADS)")
def worker(threads: int | None) -> None:
    """Run the job worker (Huey consumer) until interrupted."""
    from src.app import create_app

    url = _database_url()
    with _database_errors(url):
        _require_migrated(url)  # a worker on an empty database would fail every job it claims
        settings = Settings.from_env()
        container = create_app(settings).extensions["gpusnap"]
    try:
        container.queue.ping()  # else the consumer logs a traceback for every poll of an unreachable queue
    except Exception as e:  # noqa: BLE001 - Redis and SQLite raise their own types: any means "not there"
        where = "REDIS_URL" if settings.redis_url else f"QUEUE_PATH={settings.queue_path}"
        raise CliFailure(
            "queue_unavailable",
            f"the job queue cannot be reached ({where}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        ) from None
    run_worker(container, threads=threads or settings.worker_threads)


def run_worker(container, *, threads: int) -> None:  # type: ignore[no-untyped-def]
    """Recover what a dead worker left behind, then consume jobs (blocking, handles SIGINT/SIGTERM)."""
    recovered = container.queue.recover_stale_jobs(local_dead_workers=True)
    if recovered:
        click.echo(f"re-queued {len(recovered)} job(s) left by a stopped worker", err=True)
    consumer = container.queue.huey.create_consumer(
        workers=threads, worker_type="thread", periodic=True, initial_delay=0.05, backoff=1.5, max_delay=0.5
    )
    consumer.run()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Migrate, then run the API (gunicorn) and a worker together; Ctrl-C stops both."""
    from src.migrate import upgrade

    url = _database_url()
    with _database_errors(url):
        upgrade(url)
    # The children run from the repository root: relative SQLite paths must mean what they meant here,
    # where the database was just migrated (and where `tokens create` put its tokens).
    env = {**os.environ, **_absolute_local_paths(url)}
    children = [
        subprocess.Popen([sys.executable, "-m", "src.cli", "worker"], cwd=ROOT, env=env),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                str(ROOT / "gunicorn.conf.py"),
                "--chdir",
                str(ROOT),
                "--bind",
                f"{host}:{port}",
                "app:app",
            ],
            cwd=ROOT,
            env=env,
        ),
    ]
    click.echo(f"gpusnap API on http://{host}:{port} (worker pid {children[0].pid})", err=True)

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    finally:
        stop()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    codes = [child.returncode for child in children]
    sys.exit(0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1)
