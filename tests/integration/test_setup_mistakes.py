"""Mistakes a newcomer makes in the settings, met as early and as plainly as possible: no bucket (a 503
`not_configured` when the request is made, not a job that fails later), a missing SSH key or an
interpreter the host does not have (the message names the setting to change)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from src.adapters.remote_host import SshAuthFailed, SshClient, SshPolicy, SshTarget
from src.app import create_app
from src.models import Job
from tests.support.fixtures_app import AUTH, make_settings
from tests.support.sshd import LoopbackSshd

SCRIPTS = Path(__file__).resolve().parents[2] / "src" / "remote_scripts"
CREATE = {"instance_id": "1", "ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/workspace"}


@pytest.fixture
def bucketless(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    """The app with no R2_* settings and no object store override, but a (fake-free) vast.ai key."""
    app = create_app(make_settings(tmp_path, sqlite_url, vast_api_key="k"), configure_logs=False)
    yield app
    app.extensions["gpusnap"].engine.dispose()


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/api/gpu-snapshots", CREATE),
        ("POST", "/api/gpu-snapshots/create", CREATE),
        ("POST", "/api/instances/5001/hibernate", {"workspace_path": "/workspace", "ssh_host": "10.0.0.5"}),
        (
            "POST",
            "/api/instances/5001/hibernate",
            {"workspace_path": "/workspace", "destroy_after": False, "ssh_host": "10.0.0.5", "ssh_port": 22},
        ),
        (
            "POST",
            "/api/gpu-snapshots/snap_x/restore",
            {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/workspace"},
        ),
        ("POST", "/api/gpu-snapshots/snap_x/verify", None),
        ("DELETE", "/api/gpu-snapshots/snap_x", None),
    ],
)
def test_bucket_operations_without_a_bucket_are_503_not_configured_and_start_nothing(bucketless, method, path, body):
    r = bucketless.test_client().open(path, method=method, json=body, headers=AUTH)
    assert r.status_code == 503, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "not_configured" and "R2_BUCKET" in error["message"]
    with bucketless.extensions["gpusnap"].session_factory() as s:
        assert s.query(Job).count() == 0


def test_hibernate_that_destroys_without_a_vast_key_is_503_at_request_time(tmp_path, sqlite_url, store):
    app = create_app(make_settings(tmp_path, sqlite_url), object_store=store, configure_logs=False)
    try:
        r = app.test_client().post(
            "/api/instances/5001/hibernate", headers=AUTH, json={"workspace_path": "/workspace", "ssh_host": "10.0.0.5"}
        )
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "not_configured"
        assert "VAST_API_KEY" in r.get_json()["error"]["message"]
        snapshot_only = app.test_client().post(
            "/api/instances/m1/hibernate",
            headers=AUTH,
            json={"workspace_path": "/workspace", "ssh_host": "10.0.0.5", "ssh_port": 22, "destroy_after": False},
        )
        assert snapshot_only.status_code == 202, snapshot_only.get_data(as_text=True)
    finally:
        app.extensions["gpusnap"].engine.dispose()


def _client(sshd: LoopbackSshd, **overrides: object) -> SshClient:
    options: dict = {
        "policy": SshPolicy.from_setting("127.0.0.1/32"),
        "connect_timeout": 3,
        "ready_retries": 0,
        "remote_python": sys.executable,
        "scripts_dir": SCRIPTS,
    }
    key_path = overrides.pop("key_path", sshd.client_key_path)
    options.update(overrides)
    return SshClient(key_path, **options)  # type: ignore[arg-type]


def _target(sshd: LoopbackSshd) -> SshTarget:
    return SshTarget(host=sshd.host, port=sshd.port, user=sshd.user, pinned_host_key=None)


def test_a_missing_ssh_key_names_ssh_key_path(sshd, tmp_path):
    with pytest.raises(SshAuthFailed) as info:
        _client(sshd, key_path=tmp_path / "no-such-key").open(_target(sshd))
    assert "SSH_KEY_PATH" in info.value.message and str(tmp_path / "no-such-key") in info.value.message


@pytest.mark.parametrize("python", ["/nonexistent/python3.99", "false"])
def test_an_interpreter_the_host_lacks_names_remote_python(sshd, python):
    """The uploaded scripts are checked on the host with REMOTE_PYTHON before anything runs, so an
    interpreter that cannot run fails there; one that does not exist is named, with the setting."""
    from src.adapters.remote_errors import ScriptUploadFailed

    with pytest.raises(ScriptUploadFailed) as info:
        with _client(sshd, remote_python=python).open(_target(sshd)) as session:
            list(session.run_script("snapshot", {}))
    if python == "false":  # it ran and failed: not the interpreter's fault, no hint
        assert "REMOTE_PYTHON" not in info.value.message
    else:
        assert "REMOTE_PYTHON" in info.value.message and "/nonexistent/python3.99" in info.value.message
