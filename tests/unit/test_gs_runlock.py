"""gs_runlock: one run per snapshot/restore on a host, the newest (attempt, try) wins. Real processes,
real flock, a private XDG_CACHE_HOME; the runs left behind are children in their own process groups."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "src" / "remote_scripts"
HOLD = """
import sys, time
sys.path.insert(0, {scripts!r})
import gs_runlock
fd = gs_runlock.take({{"name": "snapshot-snap_1", "rank": [{attempt}, {try_}]}})
print("held", flush=True)
time.sleep(120)
"""


def _holder(tmp_path: Path, attempt: int, try_: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(scripts=str(SCRIPTS), attempt=attempt, try_=try_)],
        env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


@pytest.fixture
def runlock(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import gs_runlock

    return gs_runlock


def test_a_newer_run_stops_the_older_one_and_takes_the_lock(tmp_path, runlock):
    older = _holder(tmp_path, attempt=1, try_=1)
    try:
        started = time.monotonic()
        fd = runlock.take({"name": "snapshot-snap_1", "rank": [2, 1]})
        assert fd is not None and older.wait(timeout=10) != 0  # stopped by a signal
        assert time.monotonic() - started < 10
        os.close(fd)
    finally:
        if older.poll() is None:
            older.kill()


def test_an_older_run_finds_a_newer_one_and_stops_itself(tmp_path, runlock):
    newer = _holder(tmp_path, attempt=2, try_=1)
    try:
        with pytest.raises(runlock.ScriptError) as refused:
            runlock.take({"name": "snapshot-snap_1", "rank": [1, 3]})
        assert refused.value.code == "superseded" and newer.poll() is None  # the newer run goes on
    finally:
        newer.kill()


def test_a_free_lock_is_taken_and_a_bad_spec_refused(tmp_path, runlock):
    assert runlock.take(None) is None
    fd = runlock.take({"name": "restore-job_1", "rank": [1, 1]})
    os.close(fd)
    for bad in (
        {"name": "../x", "rank": [1, 1]},
        {"name": "a", "rank": [1]},
        {"name": "a", "rank": [True, 1]},
        "snapshot-snap_1",
    ):
        with pytest.raises(runlock.ScriptError) as refused:
            runlock.take(bad)
        assert refused.value.code == "bad_config"
