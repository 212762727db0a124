"""A restore that committed and is run again (the job's retry after the link dropped past the swap, or a
job re-run after its worker died) must not swap a second time: that would move the restored tree aside
and remove the kept original, the user's own workspace. Real restore.py, SeaweedFS and GNU tar, all in
tmp_path. Found by an outside tester (a second run deleted `precious.txt` for good)."""

from __future__ import annotations

import os

from tests.support.fixtures_s3 import run_script, script_config


def _snapshot_and_target(tmp_path, s3_server, s3_prefix):  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "snap.txt").write_text("from the snapshot")
    snap = run_script("snapshot", script_config(s3_server, s3_prefix, str(src), codec="none"))
    assert snap.returncode == 0, snap.last
    target = tmp_path / "data" / "ws"
    target.mkdir(parents=True)
    (target / "precious.txt").write_text("the user's unsnapshotted work")
    return target


def _copies_of_precious(root) -> list[str]:  # type: ignore[no-untyped-def]
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "precious.txt"]


def test_the_same_restore_run_twice_reports_its_commit_and_keeps_the_original(tmp_path, s3_server, s3_prefix):
    target = _snapshot_and_target(tmp_path, s3_server, s3_prefix)
    cfg = script_config(s3_server, s3_prefix, str(target), overwrite=True, restore_id="job_rerun1")
    first = run_script("restore", cfg)
    assert first.returncode == 0, first.last
    kept = first.last["previous_workspace"]
    assert (target / "snap.txt").read_text() == "from the snapshot"

    second = run_script("restore", cfg)  # the retry: same job, same id
    assert second.returncode == 0, second.last
    assert second.last["already_restored"] is True and second.last["previous_workspace"] == kept
    assert second.last["raw_bytes"] == first.last["raw_bytes"]
    assert _copies_of_precious(tmp_path / "data") == [os.path.join(kept, "precious.txt")]
    assert (target / "snap.txt").read_text() == "from the snapshot"

    # A later, different restore of the same path is a real restore again (and replaces the marker).
    third = run_script(
        "restore", script_config(s3_server, s3_prefix, str(target), overwrite=True, restore_id="job_other2")
    )
    assert third.returncode == 0 and not third.last.get("already_restored"), third.last
    markers = sorted(p.name for p in (tmp_path / "data").iterdir() if ".gpusnap-restored-" in p.name)
    assert markers == ["ws.gpusnap-restored-job_other2"]


def test_a_restore_id_that_is_not_a_plain_name_is_refused(tmp_path, s3_server, s3_prefix):
    target = _snapshot_and_target(tmp_path, s3_server, s3_prefix)
    run = run_script(
        "restore", script_config(s3_server, s3_prefix, str(target), overwrite=True, restore_id="../../etc/x")
    )
    assert run.returncode != 0 and run.last["code"] == "bad_config", run.last
    assert (target / "precious.txt").exists()
