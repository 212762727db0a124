"""restore.py's destination rules for real (local subprocess, SeaweedFS, GNU tar, s5cmd): a system directory
is refused even when the path only resolves to one on the host, a non-empty workspace is replaced only
with `overwrite`, and the replaced tree is kept beside it until the next successful restore of that path.
Also snapshot.py's scan report, which hibernate compares with the snapshot before destroying anything."""

from __future__ import annotations

import glob
import os
from typing import Any

import pytest

from tests.support.fixtures_s3 import run_script, script_config, tree_state

pytestmark = pytest.mark.slow


@pytest.fixture
def snapshot(tmp_path: Any, s3_server: Any, s3_prefix: str) -> dict[str, Any]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("from the snapshot")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    run = run_script("snapshot", script_config(s3_server, s3_prefix, str(src)))
    assert run.returncode == 0, run.stderr
    return {"src": str(src), "result": run.last}


def _old(target: str) -> list:
    return sorted(glob.glob(glob.escape(target) + ".gpusnap-old-*"))


def test_a_non_empty_workspace_needs_overwrite(
    snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, tmp_path: Any
) -> None:
    target = tmp_path / "ws"
    target.mkdir()
    (target / "mine.txt").write_text("precious")
    before = tree_state(str(target))
    run = run_script("restore", script_config(s3_server, s3_prefix, str(target)))
    assert run.returncode != 0 and run.last["code"] == "workspace_exists", run.last
    assert "mine.txt" in run.last["message"]
    assert not any(e.get("phase") == "download" for e in run.events)  # refused before any download
    assert tree_state(str(target)) == before and sorted(os.listdir(tmp_path)) == ["src", "ws"]
    run = run_script("restore", script_config(s3_server, s3_prefix, str(target), overwrite=False))
    assert run.last["code"] == "workspace_exists"


def test_overwrite_keeps_the_old_tree_until_the_next_restore(
    snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, tmp_path: Any
) -> None:
    target = str(tmp_path / "ws")
    os.makedirs(target)
    with open(os.path.join(target, "mine.txt"), "w") as fh:
        fh.write("precious")
    first = run_script("restore", script_config(s3_server, s3_prefix, target, overwrite=True))
    assert first.returncode == 0, first.stderr
    assert tree_state(target) == tree_state(snapshot["src"])
    kept = first.last["previous_workspace"]
    assert _old(target) == [kept] and kept.startswith(target + ".gpusnap-old-") and kept.endswith("Z")
    with open(os.path.join(kept, "mine.txt")) as fh:
        assert fh.read() == "precious"
    second = run_script("restore", script_config(s3_server, s3_prefix, target, overwrite=True))
    assert second.returncode == 0, second.stderr
    assert _old(target) == [second.last["previous_workspace"]] != [kept]  # the first copy is gone now
    assert tree_state(second.last["previous_workspace"]) == tree_state(snapshot["src"])


def test_an_empty_or_missing_workspace_needs_no_overwrite(
    snapshot: dict[str, Any], s3_server: Any, s3_prefix: str, tmp_path: Any
) -> None:
    empty = tmp_path / "empty"
    (empty / "lost+found").mkdir(parents=True)  # what a freshly made filesystem holds
    run = run_script("restore", script_config(s3_server, s3_prefix, str(empty)))
    assert run.returncode == 0, run.stderr
    assert run.last["previous_workspace"] is not None  # lost+found was replaced: kept all the same
    missing = str(tmp_path / "missing")
    run = run_script("restore", script_config(s3_server, s3_prefix, missing))
    assert run.returncode == 0 and run.last["previous_workspace"] is None and _old(missing) == []


# These run restore.py against this machine's real system directories. Safe by construction: the prefix
# holds no snapshot, so a script without the check fails with manifest_missing before it extracts or
# swaps anything (a check that comes first answers system_path). Never point them at a real snapshot.
EMPTY_PREFIX = "tests/no-snapshot-here/"


@pytest.mark.parametrize("path", ["/etc", "//etc/", "/usr/../etc", "/root", "/root/.ssh", "/var/tmp/ws", "/proc/x"])
def test_system_paths_are_refused_on_the_host(path: str, s3_server: Any) -> None:
    run = run_script("restore", script_config(s3_server, EMPTY_PREFIX, path, overwrite=True))
    assert run.returncode != 0 and run.last["code"] == "system_path", run.last
    assert not any(e.get("phase") == "download" for e in run.events)


def test_a_path_that_resolves_to_a_system_directory_is_refused(s3_server: Any, tmp_path: Any) -> None:
    """The request named an innocent path; on this host it is a symlink into /etc."""
    (tmp_path / "innocent").symlink_to("/etc")
    (tmp_path / "parent-link").symlink_to("/usr")
    for path in (tmp_path / "innocent", tmp_path / "parent-link" / "share" / "ws"):
        etc_before = sorted(os.listdir("/etc"))
        run = run_script("restore", script_config(s3_server, EMPTY_PREFIX, str(path), overwrite=True))
        assert run.returncode != 0 and run.last["code"] == "system_path", run.last
        assert sorted(os.listdir("/etc")) == etc_before


def test_snapshot_reports_its_scan(snapshot: dict[str, Any]) -> None:
    result = snapshot["result"]
    assert result["scan"]["entries"] == result["files"] == 3  # a.txt, sub, sub/b.bin
    assert 100_000 <= result["scan"]["bytes"] <= result["raw_bytes"]
