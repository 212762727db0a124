"""A GPU host set up the way a stock rented image is: python3 and tar, an sshd without the SFTP
subsystem, no s5cmd, no zstandard, and no package index it can reach. Snapshot, restore and verify
must still work end to end through the HTTP API, and say what they had to do instead.

The "host" is the loopback sshd (started without `Subsystem sftp`) and a REMOTE_PYTHON wrapper that
plays the part of the host user's login environment: the system python3 (no zstandard) in isolated
mode, a PATH built from /usr/bin minus s5cmd (and minus zstd where a test says so), pip pointed at
nothing (PIP_NO_INDEX, an index URL on a closed port, no config files), and an empty cache home.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import boto3
import pytest

from tests.support.trees import describe_tree, make_tricky_tree

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = "/usr/bin/python3"


def stock_host_python(root: pathlib.Path, *, zstd_binary: bool) -> str:
    """Write the host environment described above; returns the REMOTE_PYTHON wrapper's path."""
    hostbin = root / "bin"
    hostbin.mkdir(parents=True)
    hidden = {"s5cmd"} | (set() if zstd_binary else {"zstd", "unzstd", "zstdcat", "zstdmt", "pzstd"})
    for name in os.listdir("/usr/bin"):
        if name not in hidden:
            (hostbin / name).symlink_to(os.path.join("/usr/bin", name))
    home = root / "home"
    (home / ".cache").mkdir(parents=True)
    wrapper = root / "host-python3"
    wrapper.write_text(f"""#!/bin/sh
PATH={hostbin}; HOME={home}; XDG_CACHE_HOME={home}/.cache
PIP_NO_INDEX=1; PIP_INDEX_URL=http://127.0.0.1:9/simple; PIP_CONFIG_FILE=/dev/null
export PATH HOME XDG_CACHE_HOME PIP_NO_INDEX PIP_INDEX_URL PIP_CONFIG_FILE
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PYTHONPATH PYTHONHOME VIRTUAL_ENV
exec {SYSTEM_PYTHON} -I "$@"
""")
    wrapper.chmod(0o755)

    # The setup must really be what it claims, or the test proves nothing.
    def host(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(wrapper), "-c", code], capture_output=True, text=True, timeout=120)

    assert host("import zstandard").returncode != 0
    assert host("import shutil, sys; sys.exit(shutil.which('s5cmd') is not None)").returncode == 0
    assert host("import shutil, sys; sys.exit((shutil.which('zstd') is None) == %r)" % zstd_binary).returncode == 0
    pip = host(
        "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'download', "
        "'--no-deps', '-d', '/tmp/gpusnap-never', 'zstandard']))"
    )
    assert pip.returncode != 0, "the host reached a package index"
    return str(wrapper)


def _s3(s3_server):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )


def _manifest(s3_server, snap: dict) -> dict:  # type: ignore[no-untyped-def]
    body = _s3(s3_server).get_object(Bucket=s3_server.bucket, Key=snap["storage_prefix"] + "manifest.json")["Body"]
    return json.loads(body.read())


@pytest.fixture
def stock_host(stack, sshd_factory):  # type: ignore[no-untyped-def]
    host = sshd_factory(sftp=False)
    host.authorize_key_of(stack.env["SSH_KEY_PATH"])
    return host


def _use_host_python(stack, wrapper: str) -> None:  # type: ignore[no-untyped-def]
    """Restart the worker so the scripts run under the stock host's environment, with REMOTE_S5CMD at
    its default (`s5cmd`, which that host does not have)."""
    stack.stop_worker()
    stack.start_worker(REMOTE_PYTHON=wrapper, REMOTE_S5CMD="s5cmd")


def _snapshot(stack, host, workspace: pathlib.Path, instance_id: str) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": instance_id,
            "ssh_host": host.host,
            "ssh_port": host.port,
            "workspace_path": str(workspace),
            "codec": "zstd",
        },
    )
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["job"]["id"], timeout=240)
    return job, stack.get(f"/api/gpu-snapshots/{r.json()['snapshot']['id']}").json()


def _restore(stack, host, snap: dict, target: pathlib.Path) -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(
        f"/api/gpu-snapshots/{snap['id']}/restore",
        json={"ssh_host": host.host, "ssh_port": host.port, "workspace_path": str(target)},
    )
    assert r.status_code == 202, r.text
    return stack.wait_job(r.json()["job"]["id"], timeout=240)


def test_stock_host_round_trip_ships_s5cmd_and_compresses_with_the_zstd_binary(stack, stock_host, s3_server, tmp_path):
    _use_host_python(stack, stock_host_python(tmp_path / "host", zstd_binary=True))
    workspace = make_tricky_tree(tmp_path / "workspace")
    before = describe_tree(workspace)
    job, snap = _snapshot(stack, stock_host, workspace, "stock-1")
    assert job["status"] == "succeeded", job
    assert job["result"]["s5cmd"]["source"] == "shipped" and job["result"]["s5cmd"]["version"].startswith("v2.3")
    assert snap["status"] == "complete" and snap["codec"] == "zstd" and snap["stored_bytes"] < snap["raw_bytes"]
    assert any("zstd-cli" in w for w in job["result"]["warnings"]), job["result"]
    manifest = _manifest(s3_server, snap)
    assert manifest["source"]["codec_fallback"]["used"] == "zstd" and manifest["warnings"]
    assert "zstandard" in " ".join(manifest["source"]["codec_fallback"]["reasons"])

    target = tmp_path / "restored"
    restored = _restore(stack, stock_host, snap, target)
    assert restored["status"] == "succeeded", restored
    assert restored["result"]["s5cmd"]["source"] == "shipped"
    assert describe_tree(target) == before
    r = stack.post(f"/api/gpu-snapshots/{snap['id']}/verify", json={"deep": True})
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    # the scripts went over an exec channel (this sshd has no SFTP), and the shipped copy went away
    # with the job's private directory
    assert "offers no SFTP subsystem" in stack.worker_log.read_text()
    assert not pathlib.Path(job["result"]["s5cmd"]["path"]).exists()


@pytest.mark.snapshot_format(1)  # reads the format-1 manifest's parts
def test_stock_host_without_any_compressor_stores_parts_raw_and_says_so(stack, stock_host, s3_server, tmp_path):
    _use_host_python(stack, stock_host_python(tmp_path / "host", zstd_binary=False))
    workspace = make_tricky_tree(tmp_path / "workspace")
    before = describe_tree(workspace)
    job, snap = _snapshot(stack, stock_host, workspace, "stock-2")
    assert job["status"] == "succeeded", job
    assert snap["codec"] == "none" and snap["stored_bytes"] == snap["raw_bytes"]
    assert job["result"]["codec_fallback"]["used"] == "none"
    assert job["result"]["warnings"][0].startswith("codec zstd was asked for; parts are stored with none")
    manifest = _manifest(s3_server, snap)
    assert manifest["warnings"] == job["result"]["warnings"]
    assert {p["codec"] for p in manifest["parts"]} == {"none"}
    target = tmp_path / "restored"
    assert _restore(stack, stock_host, snap, target)["status"] == "succeeded"
    assert describe_tree(target) == before


def test_zstd_snapshot_restores_on_a_host_without_zstandard(stack, sshd, stock_host, tmp_path):
    workspace = make_tricky_tree(tmp_path / "workspace")
    before = describe_tree(workspace)
    job, snap = _snapshot(stack, sshd, workspace, "stock-3")  # a host with the zstandard package
    assert job["status"] == "succeeded" and snap["codec"] == "zstd" and not job["result"]["warnings"], job

    _use_host_python(stack, stock_host_python(tmp_path / "host-zstd", zstd_binary=True))
    target = tmp_path / "restored"
    assert _restore(stack, stock_host, snap, target)["status"] == "succeeded"
    assert describe_tree(target) == before  # decoded by the zstd binary

    _use_host_python(stack, stock_host_python(tmp_path / "host-bare", zstd_binary=False))
    untouched = tmp_path / "untouched"
    failed = _restore(stack, stock_host, snap, untouched)
    assert failed["status"] == "failed" and failed["error"]["code"] == "missing_dependency", failed
    assert "zstd" in failed["error"]["message"] and not untouched.exists()
