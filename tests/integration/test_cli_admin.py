"""The admin commands as a newcomer meets them: on a database that was never migrated, with a name that
already exists, with a database that does not answer or a setting that does not parse. Each ends in one
line `error: <code>: <message>` naming what to do, exit 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from src.app import create_app
from src.cli import main
from src.migrate import upgrade
from src.settings import Settings
from tests.support.services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpusnap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The real console entry (`python -m src.cli`), so that what a user sees on stderr is what is checked."""
    full = {**os.environ, "PYTHONPATH": ROOT, **env}
    full.pop("GPUSNAP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "src.cli", *args], env=full, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def _one_line_error(result: subprocess.CompletedProcess, code: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args", [("tokens", "create", "me"), ("tokens", "ls"), ("tokens", "revoke", "me"), ("worker",)]
)
def test_admin_commands_on_an_unmigrated_database_say_to_run_db_upgrade(tmp_path, args):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'instance' / 'gpusnap.db'}",
        "QUEUE_PATH": str(tmp_path / "instance" / "queue.db"),
    }
    line = _one_line_error(_gpusnap(env, *args), "not_migrated")
    assert "gpusnap db upgrade" in line


def test_tokens_create_again_needs_replace_and_replace_retires_the_old_token(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    env = {"DATABASE_URL": url}
    upgraded = _gpusnap(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    first = _gpusnap(env, "tokens", "create", "me")
    assert first.returncode == 0 and first.stdout.strip().startswith("gps_"), first.stderr
    again = _one_line_error(_gpusnap(env, "tokens", "create", "me"), "token_exists")
    assert "--replace" in again
    second = _gpusnap(env, "tokens", "create", "me", "--replace")
    assert second.returncode == 0, second.stderr
    old, new = first.stdout.strip(), second.stdout.strip()
    assert old != new

    app = create_app(
        Settings(database_url=url, queue_path=str(tmp_path / "q.db"), log_format="text"), configure_logs=False
    )
    try:
        client = app.test_client()
        assert client.get("/api/gpu-snapshots", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert client.get("/api/gpu-snapshots", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    finally:
        app.extensions["gpusnap"].engine.dispose()
    assert _gpusnap(env, "tokens", "ls").stdout.count("me\t") == 1


def test_a_database_that_does_not_answer_is_one_line_without_the_password(tmp_path):
    env = {"DATABASE_URL": f"postgresql://gpusnap:hunter2@127.0.0.1:{free_port()}/x"}
    line = _one_line_error(_gpusnap(env, "tokens", "ls"), "database_unavailable")
    assert "hunter2" not in line and "DATABASE_URL" in line
    line = _one_line_error(_gpusnap(env, "db", "upgrade"), "database_unavailable")
    assert "hunter2" not in line


@pytest.mark.parametrize(
    "env,code", [({"DATABASE_URL": "not a url"}, "database_unavailable"), ({"WORKER_THREADS": "many"}, "bad_settings")]
)
def test_bad_settings_are_one_line(tmp_path, env, code):
    line = _one_line_error(_gpusnap({"DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}", **env}, "tokens", "ls"), code)
    assert "DATABASE_URL" in line or "WORKER_THREADS" in line


def test_an_unexpected_failure_is_one_line_and_gpusnap_debug_shows_the_traceback(tmp_path, monkeypatch):
    """The group's last net: a bug in a command prints its type and first line, not a traceback."""
    upgrade(f"sqlite:///{tmp_path / 'g.db'}")

    @main.command("explode-for-test")
    def explode() -> None:
        raise RuntimeError("boom\nsecond line")

    try:
        monkeypatch.delenv("GPUSNAP_DEBUG", raising=False)
        result = CliRunner().invoke(main, ["explode-for-test"], catch_exceptions=False)
        assert result.exit_code == 1 and "error: internal: RuntimeError: boom" in result.output
        assert "second line" not in result.output and "Traceback" not in result.output
        monkeypatch.setenv("GPUSNAP_DEBUG", "1")
        with pytest.raises(RuntimeError):
            CliRunner().invoke(main, ["explode-for-test"], catch_exceptions=False)
    finally:
        main.commands.pop("explode-for-test")
