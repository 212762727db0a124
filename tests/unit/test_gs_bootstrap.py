"""gs_bootstrap (private pip installs) and gs_common (event stream) without network."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_bootstrap import ensure, private_dir  # noqa: E402
from gs_common import Events, ScriptError, StdoutGone  # noqa: E402


def test_present_module_is_returned_without_install() -> None:
    assert ensure("json", "json", pip=["false"]) is json


def test_module_already_in_private_dir_is_found(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "gs_fake_dep_xyz.py").write_text("VALUE = 42\n")
    try:
        mod = ensure("gs_fake_dep_xyz", "gs-fake-dep", pip=["false"], target=str(tmp_path))
        assert mod.VALUE == 42
    finally:
        sys.path.remove(str(tmp_path))


def test_failed_install_is_missing_dependency_naming_the_module(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScriptError) as err:
        ensure(
            "gs_not_a_module_abc",
            "gs-not-a-package",
            pip=["false"],
            target=str(tmp_path / "lib"),
            pins={"gs-not-a-package": ["gs-not-a-package==1.0 --hash=sha256:" + "0" * 64]},
        )
    sys.path.remove(str(tmp_path / "lib"))
    assert err.value.code == "missing_dependency" and "gs_not_a_module_abc" in err.value.message


def test_install_puts_the_module_in_the_private_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a stand-in "pip" that writes the module where --target points
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import sys, os\nt = sys.argv[sys.argv.index('--target') + 1]\n"
        "open(os.path.join(t, 'gs_installed_dep.py'), 'w').write('OK = True\\n')\n"
    )
    target = str(tmp_path / "lib")
    try:
        mod = ensure(
            "gs_installed_dep",
            "gs-installed-dep",
            pip=[sys.executable, str(fake_pip)],
            target=target,
            pins={"gs-installed-dep": ["gs-installed-dep==1.0 --hash=sha256:" + "0" * 64]},
        )
        assert mod.OK and os.path.exists(os.path.join(target, "gs_installed_dep.py"))
    finally:
        sys.path.remove(target)


def test_private_dir_is_under_the_user_cache(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    per_python = "pylib-py%d%d" % sys.version_info[:2]
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert private_dir() == os.path.join(str(tmp_path), ".cache", "gpusnap", per_python)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert private_dir() == os.path.join(str(tmp_path / "xdg"), "gpusnap", per_python)


def test_events_redact_and_throttle(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "out"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT)
    events = Events(fd=fd, min_interval=60)
    events.redact("s3cr3t")
    events.progress(force=True, phase="upload", bytes_done=1)
    events.progress(bytes_done=2)  # throttled: within the interval
    events.emit("error", code="x", message="auth with s3cr3t failed")
    os.close(fd)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["message"] == "auth with *** failed"
    assert [line["event"] for line in lines] == ["progress", "error"]


def test_events_report_a_closed_reader() -> None:
    r, w = os.pipe()
    os.close(r)
    events = Events(fd=w)
    with pytest.raises(StdoutGone):
        events.emit("progress")
    os.close(w)


def test_nothing_follows_the_final_event(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "out"
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT)
    events = Events(fd=fd, min_interval=0)
    events.emit("result", ok=True)
    events.progress(force=True, phase="late heartbeat")
    os.close(fd)
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["result"]
