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


def test_a_cancel_kills_the_child_and_no_walk_follows(tmp_path: pathlib.Path) -> None:
    import pytest
    from gs_common import ScriptError

    root = tree(tmp_path / "ws")
    c = ctx()
    walk = BackgroundScan(c, str(root), [])
    c.cancel("cancelled")
    try:
        found = walk.result()
    except ScriptError as exc:  # the child was killed: the run is over, no walk in-process
        assert exc.code == "cancelled"
    else:
        assert found == scan(str(root), [])  # it had finished before the cancel
    with pytest.raises(ScriptError):
        c.check()


def test_the_hosts_python_environment_cannot_answer_for_the_child(tmp_path: pathlib.Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A GPU host image's sitecustomize or PYTHON* variables do not reach the child (-I -S), and a
    line that looks like an answer without the parent's nonce is not taken for one."""
    root = tree(tmp_path / "ws")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        'atexit.register(lambda: print(\'{"nonce": "x", "bytes": 0, "entries": 0, "seconds": 0}\'))\n'
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    monkeypatch.setenv("PYTHONINSPECT", "1")
    walk = BackgroundScan(ctx(), str(root), [])
    walk._done.wait(30)
    assert walk.total() is not None  # the child answered, no in-process fallback needed
    assert walk.result() == scan(str(root), [])


def test_undecodable_names_in_root_and_excludes_walk_as_in_process(tmp_path: pathlib.Path) -> None:
    base = os.fsencode(str(tmp_path))
    root = base + b"/ws-\xff\xfe"
    os.makedirs(root + b"/sub-\xe9")
    for i in range(5):
        with open(root + b"/sub-\xe9/f%d-\xff.log" % i, "wb") as fh:
            fh.write(b"x" * 1000)
    with open(root + b"/keep", "wb") as fh:
        fh.write(b"y" * 3000)
    path, pattern = os.fsdecode(root), os.fsdecode(b"*-\xff.log")
    walk = BackgroundScan(ctx(), path, [pattern])
    walk._done.wait(30)
    assert walk.total() is not None
    assert walk.result() == scan(path, [pattern]) != scan(path, [])
