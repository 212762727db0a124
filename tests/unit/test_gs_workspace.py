"""gs_workspace: size pre-scan and the staging swap (local temporary directories only)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_common import ScriptError  # noqa: E402
from gs_workspace import Staging, occupied, scan  # noqa: E402


def test_scan_estimates_tar_size_and_honours_excludes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "skip.tmp").write_bytes(b"x" * 100000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 10)
    total, entries = scan(str(tmp_path), ["*.tmp"])
    assert entries == 4  # root, a.bin, d, d/b
    assert total == 512 * 4 + 1024 + 512


def test_commit_swaps_and_keeps_old_until_the_next_restore(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "ws"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = Staging(str(target), "t1")
    staging.create()
    (tmp_path / "ws.gpusnap-staging-t1" / "new.txt").write_text("new")
    staging.commit()
    assert sorted(os.listdir(target)) == ["new.txt"]
    kept = staging.kept_old
    assert kept is not None and os.path.basename(kept).startswith("ws.gpusnap-old-")
    assert kept.endswith("Z") and sorted(os.listdir(tmp_path)) == ["ws", os.path.basename(kept)]
    assert (tmp_path / os.path.basename(kept) / "old.txt").read_text() == "old"
    # The next successful restore of the path keeps what it replaced and removes the earlier copy.
    again = Staging(str(target), "t2")
    assert again.old != kept  # same second: a distinct name
    again.create()
    (tmp_path / "ws.gpusnap-staging-t2" / "newer.txt").write_text("newer")
    again.commit()
    assert sorted(os.listdir(tmp_path)) == ["ws", os.path.basename(again.kept_old)]
    assert sorted(os.listdir(again.kept_old)) == ["new.txt"]


def test_an_empty_workspace_is_not_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ws").mkdir()
    staging = Staging(str(tmp_path / "ws"), "t1")
    staging.create()
    staging.commit()
    assert staging.kept_old is None and sorted(os.listdir(tmp_path)) == ["ws"]


def test_occupied_ignores_our_dirs_and_an_empty_lost_and_found(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ws = tmp_path / "ws"
    assert occupied(str(ws)) == []
    ws.mkdir()
    (ws / ".gpusnap-old-20260101T000000Z").mkdir()
    (ws / ".gpusnap-staging-x").mkdir()
    (ws / "lost+found").mkdir()
    assert occupied(str(ws)) == []
    (ws / "lost+found" / "#123").write_text("x")
    assert occupied(str(ws)) == ["lost+found"]
    (ws / ".hidden").write_text("x")
    assert occupied(str(ws)) == [".hidden", "lost+found"]


def test_scan_counts_hard_links_once_and_anchored_excludes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").write_bytes(b"x" * 4096)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "big").write_bytes(b"y" * 8192)
    total, entries = scan(str(tmp_path), ["./cache"])  # tar matches "./cache": so must the scan
    assert entries == 3  # root, a, b
    assert total == 512 * 3 + 4096


def test_commit_into_missing_target_and_discard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    staging = Staging(str(tmp_path / "fresh"), "t2")
    staging.create()
    staging.commit()
    assert (tmp_path / "fresh").is_dir()
    other = Staging(str(tmp_path / "fresh"), "t3")
    other.create()
    other.discard()
    assert sorted(os.listdir(tmp_path)) == ["fresh"]


def test_stale_staging_dirs_are_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ws.gpusnap-staging-dead").mkdir()
    (tmp_path / "ws.gpusnap-old-dead").mkdir()  # never removed: it may be the only copy left
    Staging(str(tmp_path / "ws"), "live").remove_stale()
    assert sorted(os.listdir(tmp_path)) == ["ws.gpusnap-old-dead"]


def test_target_that_is_a_file_is_bad_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ScriptError) as err:
        Staging(str(tmp_path / "f"), "x")
    assert err.value.code == "bad_config"
