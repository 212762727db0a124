"""gs_scan.BackgroundScan: the snapshot's pre-scan in a child process, beside the stream."""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "remote_scripts"))

from gs_common import Context, Events  # noqa: E402
from gs_scan import BackgroundScan  # noqa: E402
from gs_workspace import scan  # noqa: E402


def ctx() -> Context:
    return Context(Events(fd=os.open(os.devnull, os.O_WRONLY)))


def tree(root: pathlib.Path) -> pathlib.Path:
    (root / "a" / "b").mkdir(parents=True)
    for i in range(50):
        (root / "a" / ("f%d" % i)).write_bytes(b"x" * (i * 100))
    (root / "a" / "b" / "skip.log").write_bytes(b"y" * 5000)
    os.link(root / "a" / "f9", root / "hard")
    (root / "link").symlink_to("a/f1")
    return root


def test_the_child_finds_what_the_in_process_walk_finds(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path / "ws")
    for excludes in ([], ["*.log"]):
        walk = BackgroundScan(ctx(), str(root), excludes)
        assert walk.result() == scan(str(root), excludes)
        assert walk.total() == walk.result()[0] and walk.seconds >= 0


def test_total_is_unknown_until_the_walk_ends_then_known() -> None:
    walk = BackgroundScan.__new__(BackgroundScan)  # no child: the state a running walk is in
    import threading

    walk._done, walk._result, walk.seconds = threading.Event(), None, 0.0
    assert walk.total() is None
    walk._result = (1024, 3)
    walk._done.set()
    assert walk.total() == 1024


def test_without_a_child_the_walk_runs_in_process(tmp_path: pathlib.Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tree(tmp_path / "ws")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    walk = BackgroundScan(ctx(), str(root), [])
    assert walk.total() is None  # nothing ran yet
    assert walk.result() == scan(str(root), [])


def test_a_cancel_kills_the_child_and_result_still_answers(tmp_path: pathlib.Path) -> None:
    root = tree(tmp_path / "ws")
    c = ctx()
    walk = BackgroundScan(c, str(root), [])
    c.cancel("cancelled")
    assert walk.result() == scan(str(root), [])  # killed or finished: an answer either way
