"""Server-side commands: migrations, tokens, the job worker, and `serve` (API and worker together)."""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

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

    url = Settings.from_env().database_url
    upgrade(url)
    click.echo(f"database at revision {current_revision(url)}")


@click.group()
def tokens() -> None:
    """API tokens (stored as SHA-256 only)."""


@contextmanager
def _sessions() -> Iterator[Any]:
    """A session factory on DATABASE_URL for one command; its engine is disposed afterwards. A domain error
    (a duplicate name, an unknown token) ends the command with its message."""
    from src.db import make_engine, make_session_factory

    engine = make_engine(Settings.from_env().database_url)
    try:
        yield make_session_factory(engine)
    except GpusnapError as e:
        raise click.ClickException(e.message) from None
    finally:
        engine.dispose()


@tokens.command("create")
@click.argument("name")
def tokens_create(name: str) -> None:
    """Create a token called NAME and print it (the only time it is shown)."""
    from src.services.tokens import create_token

    with _sessions() as sessions:
        click.echo(create_token(sessions, name))


@tokens.command("ls")
def tokens_ls() -> None:
    """List tokens (names and dates; the tokens themselves are not stored)."""
    from src.services.tokens import list_tokens

    with _sessions() as sessions:
        rows = list_tokens(sessions)
    for t in rows:
        click.echo(f"{t['name']}\tcreated {t['created_at']}" + (f"\trevoked {t['revoked_at']}" if t["revoked_at"] else ""))


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke the token called NAME."""
    from src.services.tokens import revoke_token

    with _sessions() as sessions:
        revoke_token(sessions, name)
    click.echo(f"revoked {name}")


@click.command()
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Jobs run at once (default WORKER_THREADS)")
def worker(threads: int | None) -> None:
    """Run the job worker (Huey consumer) until interrupted."""
    from src.app import create_app

    settings = Settings.from_env()
    container = create_app(settings).extensions["gpusnap"]
    run_worker(container, threads=threads or settings.worker_threads)


def run_worker(container, *, threads: int) -> None:  # type: ignore[no-untyped-def]
    """Recover what a dead worker left behind, then consume jobs (blocking, handles SIGINT/SIGTERM)."""
    recovered = container.queue.recover_stale_jobs(local_dead_workers=True)
    if recovered:
        click.echo(f"re-queued {len(recovered)} job(s) left by a stopped worker", err=True)
    consumer = container.queue.huey.create_consumer(workers=threads, worker_type="thread", periodic=True,
                                                    initial_delay=0.05, backoff=1.5, max_delay=0.5)
    consumer.run()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Migrate, then run the API (gunicorn) and a worker together; Ctrl-C stops both."""
    from src.migrate import upgrade

    upgrade(Settings.from_env().database_url)
    children = [
        subprocess.Popen([sys.executable, "-m", "src.cli", "worker"], cwd=ROOT),
        subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                          "--chdir", str(ROOT), "--bind", f"{host}:{port}", "app:app"], cwd=ROOT),
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
