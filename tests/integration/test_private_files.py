"""The SQLite database (token digests, job parameters, pinned host keys) and the SQLite queue (Huey pickles
task payloads into it) are readable by the service's user only: directory 0700, files 0600, -wal/-shm too,
whatever the umask."""

from __future__ import annotations

import os
import stat

import pytest

from src.app import create_app
from src.migrate import upgrade
from src.settings import Settings
from tests.support.fixtures_app import AUTH, TOKEN


def _mode(path) -> int:  # type: ignore[no-untyped-def]
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():  # type: ignore[no-untyped-def]
    old = os.umask(0o022)  # the common default: files 0644, directories 0755
    yield
    os.umask(old)


def test_instance_directory_is_0700_and_every_database_file_0600(tmp_path, loose_umask):
    instance = tmp_path / "fresh" / "instance"
    db, queue = instance / "gpusnap.db", instance / "queue.db"
    settings = Settings(database_url=f"sqlite:///{db}", queue_path=str(queue), api_tokens=(TOKEN,), log_format="text")
    upgrade(settings.database_url)
    app = create_app(settings, configure_logs=False)
    try:
        client = app.test_client()
        assert client.get("/api/gpu-snapshots", headers=AUTH).status_code == 200
        app.extensions["gpusnap"].queue.huey.enqueue(app.extensions["gpusnap"].queue.huey.task()(lambda: 1).s())
        assert _mode(instance) == 0o700
        files = sorted(p.name for p in instance.iterdir())
        assert {"gpusnap.db", "queue.db"} <= set(files)
        assert any(name.endswith("-wal") for name in files), files  # WAL mode: the side files exist
        for name in files:
            assert _mode(instance / name) == 0o600, (name, oct(_mode(instance / name)))
    finally:
        app.extensions["gpusnap"].engine.dispose()


def test_a_database_left_world_readable_is_narrowed(tmp_path, loose_umask):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    db = home / "old.db"
    upgrade(f"sqlite:///{db}")
    os.chmod(db, 0o644)  # as an older version left it
    app = create_app(
        Settings(
            database_url=f"sqlite:///{db}", queue_path=str(tmp_path / "q.db"), api_tokens=(TOKEN,), log_format="text"
        ),
        configure_logs=False,
    )
    try:
        assert app.test_client().get("/api/gpu-snapshots", headers=AUTH).status_code == 200
        assert _mode(db) == 0o600 and _mode(home / "old.db-wal") == 0o600
    finally:
        app.extensions["gpusnap"].engine.dispose()
    assert _mode(home) == 0o755  # a directory we did not create is left as it is
