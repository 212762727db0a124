"""The app in-process, with a real database and a real (SQLite) Huey queue. Jobs are run by calling
`run_jobs(app)`, which drains the queue through the same JobRunner the worker uses."""

from __future__ import annotations

from typing import Any

import pytest

from src.app import create_app
from src.settings import Settings
from tests.fakes.fake_object_store import FakeObjectStore

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(tmp_path, database_url: str, **overrides: Any) -> Settings:  # type: ignore[no-untyped-def]
    base = Settings(
        database_url=database_url,
        queue_path=str(tmp_path / "queue.db"),
        api_tokens=(TOKEN,),
        job_heartbeat_s=0.2,
        log_format="text",
        ssh_allowed_networks=("127.0.0.1/32", "10.0.0.0/8"),
    )
    return base.replace(**overrides)


def run_jobs(app, *, limit: int = 100) -> int:  # type: ignore[no-untyped-def]
    """Run every job waiting in the app's queue, in this thread, in order. Returns how many ran."""
    huey = app.extensions["gpusnap"].queue.huey
    count = 0
    while count < limit:
        task = huey.dequeue()
        if task is None:
            return count
        huey.execute(task)
        count += 1
    return count


@pytest.fixture
def store() -> FakeObjectStore:
    return FakeObjectStore()


@pytest.fixture
def app(tmp_path, database_url, store):  # type: ignore[no-untyped-def]
    """The app on SQLite and on PostgreSQL (through `database_url`), with an in-memory object store."""
    application = create_app(make_settings(tmp_path, database_url), object_store=store, configure_logs=False)
    yield application
    application.extensions["gpusnap"].engine.dispose()


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()
