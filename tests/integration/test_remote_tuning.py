"""Self-tuning of the remote scripts (gs_tuning), run for real: snapshot.py and restore.py against the
SeaweedFS test server, the real s5cmd, and tests/support/s3_fault_proxy.py answering 503 SlowDown (S3's
throttling answer) to every try of one part, s5cmd's own retries included. (`cat` says nothing when it
gives up, so a restore counts one failed try; an upload sees each of s5cmd's retries.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fixtures_s3 import run_script, script_config, tree_state
from tests.support.s3_fault_proxy import Fault, S3FaultProxy

pytestmark = pytest.mark.slow

# s5cmd runs with --retry-count 5: six requests answered SlowDown make one s5cmd command fail.
S5CMD_TRIES = 6


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint, seed=13) as p:
        yield p


@pytest.fixture
def src(tmp_path: Path) -> str:
    """About five parts of 64 KiB (part-00000 .. part-00005: no key contains another's name)."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "data.bin").write_bytes(os.urandom(300 * 1024))
    (root / "notes.txt").write_text("notes\n" * 100)
    return str(root)


def _check_tuning(tuning: dict[str, Any], cap: int) -> None:
    assert tuning["parallelism_cap"] == cap
    assert 1 <= tuning["parallelism_start"] <= tuning["parallelism_max"] <= cap
    assert tuning["parallelism_max_used"] <= tuning["parallelism_max"]
    assert 1 <= tuning["compress_workers"] <= min(tuning["cpus"], tuning["parallelism_max"])
    assert tuning["cpus"] <= (os.cpu_count() or 1)
    assert tuning["mem_available"] > 0


def test_snapshot_and_restore_report_settings_within_the_configured_cap(
    tmp_path: Path, s3_server: Any, s3_prefix: str, src: str
) -> None:
    snap = run_script("snapshot", script_config(s3_server, s3_prefix, src, parallelism=3))
    assert snap.returncode == 0, snap.stderr
    tuning = snap.last["tuning"]
    _check_tuning(tuning, 3)
    assert tuning["part_size"] == 64 * 1024 and tuning["backoffs"] == 0 and tuning["throttles"] == 0

    target = str(tmp_path / "restored")
    restored = run_script(
        "restore",
        script_config(s3_server, s3_prefix, target, parallelism=5, manifest_sha256=snap.last["manifest_sha256"]),
    )
    assert restored.returncode == 0, restored.stderr
    _check_tuning(restored.last["tuning"], 5)
    assert restored.last["tuning"]["backoffs"] == 0
    assert tree_state(target) == tree_state(src)


def test_a_throttled_upload_backs_off_and_is_sent_again(
    proxy: S3FaultProxy, s3_server: Any, s3_prefix: str, src: str
) -> None:
    proxy.plan(Fault("503", method="PUT", key_contains="part-00001", count=S5CMD_TRIES))
    cfg = script_config(s3_server, s3_prefix, src, codec="none", parallelism=4)
    cfg["s3"] = s3_server.script_s3(endpoint=proxy.endpoint)
    run = run_script("snapshot", cfg, timeout=180)
    assert run.returncode == 0, (run.last, run.stderr[-2000:])
    assert proxy.stats.faults.get("503") == S5CMD_TRIES  # s5cmd gave up on it once
    tuning = run.last["tuning"]
    # Each of s5cmd's retries is seen as it happens (--log debug), and its final failure too; the
    # burst halves the limit, and the level that was throttled is not reached again.
    assert tuning["throttles"] >= S5CMD_TRIES and tuning["backoffs"] >= 1
    assert tuning["parallelism_end"] < tuning["parallelism_start"] == 4
    assert run.last["parts"] == run.last["uploaded_parts"]


def test_a_throttled_download_backs_off_and_the_restore_completes(
    proxy: S3FaultProxy, tmp_path: Path, s3_server: Any, s3_prefix: str, src: str
) -> None:
    snap = run_script("snapshot", script_config(s3_server, s3_prefix, src, codec="none"))
    assert snap.returncode == 0, snap.stderr
    proxy.plan(Fault("503", method="GET", key_contains="part-00002", count=S5CMD_TRIES))
    target = str(tmp_path / "restored")
    cfg = script_config(s3_server, s3_prefix, target, parallelism=4, manifest_sha256=snap.last["manifest_sha256"])
    cfg["s3"] = s3_server.script_s3(endpoint=proxy.endpoint)
    run = run_script("restore", cfg, timeout=180)
    assert run.returncode == 0, (run.last, run.stderr[-2000:])
    assert proxy.stats.faults.get("503") == S5CMD_TRIES
    assert run.last["tuning"]["backoffs"] == 1 and run.last["tuning"]["throttles"] == 1
    assert tree_state(target) == tree_state(src)


def test_a_store_that_keeps_throttling_fails_the_upload_after_three_tries(
    proxy: S3FaultProxy, s3_server: Any, s3_prefix: str, src: str
) -> None:
    proxy.plan(Fault("503", method="PUT", key_contains="part-00001", count=100))
    cfg = script_config(s3_server, s3_prefix, src, codec="none", parallelism=2)
    cfg["s3"] = s3_server.script_s3(endpoint=proxy.endpoint)
    run = run_script("snapshot", cfg, timeout=300)
    assert run.returncode != 0 and run.error_code == "upload_failed"  # retryable by the job (REMOTE_TRIES)
    assert "SlowDown" in run.last["message"]
    assert proxy.stats.faults.get("503") == 3 * S5CMD_TRIES  # THROTTLE_TRIES sends, each retried by s5cmd
