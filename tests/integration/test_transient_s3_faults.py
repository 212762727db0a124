"""Transient object-store faults are retried, not reported as corruption (issue 14).

Real parts: SeaweedFS behind tests/support/s3_fault_proxy.py, the real s5cmd (2.3.0, which exits 0 with a
short body after a connection reset mid-GET), real tar, a real tmpfs mount for the mount-point case.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from src.adapters.object_store import ObjectStore
from tests.support.fixtures_s3 import run_script, script_config, tree_state
from tests.support.s3_fault_proxy import Fault, S3FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint, seed=14) as p:
        yield p


def take_snapshot(tmp_path: Any, s3_server: Any, s3_prefix: str, *, part_size: int, size: int) -> dict[str, Any]:
    """A real snapshot (uploaded straight to the server, codec none so sizes are predictable)."""
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "sub"))
    with open(os.path.join(src, "sub", "big.bin"), "wb") as fh:
        fh.write(os.urandom(size))
    with open(os.path.join(src, "small.txt"), "w") as fh:
        fh.write("small")
    run = run_script("snapshot", script_config(s3_server, s3_prefix, src, codec="none", part_size=part_size))
    assert run.returncode == 0, run.stderr
    return {"src": src, "manifest_sha256": run.last["manifest_sha256"], "parts": run.last["parts"]}


@pytest.fixture
def snapshot(tmp_path: Any, s3_server: Any, s3_prefix: str) -> dict[str, Any]:
    # Parts of 256 KiB: s5cmd 2.3.0 writes a body to stdout in 64 KiB pieces, and only once a piece
    # is out can it no longer retry cleanly; a reset later in the body gives exit 0 and a short body.
    return take_snapshot(tmp_path, s3_server, s3_prefix, part_size=256 * 1024, size=1200 * 1024)


@pytest.fixture
def workspace(tmp_path: Any) -> str:
    target = str(tmp_path / "ws")
    os.makedirs(target)
    with open(os.path.join(target, "old.txt"), "w") as fh:
        fh.write("the old workspace")
    return target


def restore_via(proxy: S3FaultProxy, s3_server: Any, prefix: str, target: str, **extra: Any) -> Any:
    extra.setdefault("overwrite", True)  # the target holds an old workspace on purpose
    cfg = script_config(s3_server, prefix, target, **extra)
    cfg["s3"] = s3_server.script_s3(endpoint=proxy.endpoint)
    return run_script("restore", cfg, timeout=180)


def test_a_part_cut_short_by_a_reset_is_fetched_again(
    proxy: S3FaultProxy, snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, workspace: str
) -> None:
    proxy.plan(
        Fault("reset", method="GET", key_contains="part-00001", keep_fraction=0.5),
        Fault("reset", method="GET", key_contains="part-00003", keep_fraction=0.8, count=2),
    )
    run = restore_via(proxy, s3_server, s3_prefix, workspace)
    assert run.returncode == 0, (run.last, run.stderr[-2000:])
    assert proxy.stats.faults.get("reset") == 3  # the faults did happen, and were absorbed
    assert tree_state(workspace) == tree_state(snapshot["src"])


def test_a_manifest_cut_short_is_not_reported_as_changed(
    proxy: S3FaultProxy, tmp_path: Any, s3_server: Any, s3_prefix: str, workspace: str
) -> None:
    # ~400 parts: a manifest of ~90 KB, so more than s5cmd's first 64 KiB is out before the reset
    snapshot = take_snapshot(tmp_path, s3_server, s3_prefix, part_size=4096, size=1600 * 1024)
    proxy.plan(Fault("reset", method="GET", key_contains="manifest.json", keep_fraction=0.9))
    run = restore_via(proxy, s3_server, s3_prefix, workspace, manifest_sha256=snapshot["manifest_sha256"])
    assert run.returncode == 0, (run.last, run.stderr[-2000:])
    assert proxy.stats.faults.get("reset") == 1
    assert tree_state(workspace) == tree_state(snapshot["src"])


def test_a_part_that_never_arrives_whole_is_a_download_failure(
    proxy: S3FaultProxy, snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, workspace: str
) -> None:
    proxy.plan(Fault("reset", method="GET", key_contains="part-00002", keep_fraction=0.8, count=100))
    before = tree_state(workspace)
    run = restore_via(proxy, s3_server, s3_prefix, workspace)
    assert run.returncode != 0
    assert run.error_code == "download_failed", run.last  # retryable, not part_truncated
    assert "part-00002" in run.last["message"]
    assert tree_state(workspace) == before


def test_5xx_answers_are_retried(
    proxy: S3FaultProxy, snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, workspace: str
) -> None:
    proxy.plan(
        Fault("503", method="GET", key_contains="part-", count=3),
        Fault("500", method="GET", key_contains="manifest.json", count=1),
    )
    run = restore_via(proxy, s3_server, s3_prefix, workspace)
    assert run.returncode == 0, (run.last, run.stderr[-2000:])
    assert tree_state(workspace) == tree_state(snapshot["src"])


def test_a_really_truncated_part_is_still_part_truncated(
    proxy: S3FaultProxy, snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, s3_client: Any, workspace: str
) -> None:
    """Retries must not hide damage: the bucket's own size of the object decides."""
    key = s3_prefix + "part-00001"
    body = s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=s3_server.bucket, Key=key, Body=body[:1000])
    run = restore_via(proxy, s3_server, s3_prefix, workspace)
    assert run.error_code == "part_truncated", run.last


def test_control_plane_reads_are_retried_after_a_reset(
    proxy: S3FaultProxy, snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    store = ObjectStore(
        endpoint=proxy.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    key = s3_prefix + "part-00001"
    whole = s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    proxy.plan(Fault("reset", method="GET", key_contains="part-00001", keep_fraction=0.5, count=2))
    assert store.get_bytes(key) == whole
    proxy.plan(Fault("reset", method="GET", key_contains="part-00001", keep_fraction=0.2))
    size, _digest = store.sha256(key) or (0, "")
    assert size == len(whole) and proxy.stats.faults["reset"] == 3


@pytest.fixture
def mounted_workspace(tmp_path: Any) -> Iterator[str]:
    import subprocess

    path = str(tmp_path / "volume")
    os.makedirs(path)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path], capture_output=True)
    if res.returncode != 0:
        pytest.skip(
            "SKIPPED LOUDLY: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN), so the "
            "mount-point failure path is untested: %s" % res.stderr.decode().strip()
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_failed_restore_into_a_mount_point_leaves_the_root_as_it_was(
    proxy: S3FaultProxy,
    snapshot: dict[str, Any],
    s3_server: Any,
    s3_prefix: str,
    s3_client: Any,
    mounted_workspace: str,
) -> None:
    target = mounted_workspace
    with open(os.path.join(target, "old.txt"), "w") as fh:
        fh.write("old")
    os.chmod(target, 0o751)
    os.chown(target, 1234, 5678)
    os.utime(target, ns=(1_000_000_000_123, 981173106_123456789))
    os.makedirs(os.path.join(target, ".gpusnap-staging-999-dead"))  # left by a killed restore
    os.utime(target, ns=(1_000_000_000_123, 981173106_123456789))
    before = os.lstat(target)
    key = s3_prefix + "part-00002"
    body = bytearray(s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    body[10] ^= 0xFF
    s3_client.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(body))
    run = restore_via(proxy, s3_server, s3_prefix, target)
    assert run.error_code == "part_corrupt", run.last
    after = os.lstat(target)
    assert os.path.ismount(target)
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o751, 1234, 5678)
    assert (after.st_mtime_ns, after.st_atime_ns) == (before.st_mtime_ns, before.st_atime_ns)
    assert sorted(os.listdir(target)) == ["old.txt"]
