"""gs_receive.py, the host side of an upload over an exec channel, run for real as the control plane
runs it: `python -c <source> <dir> receive|check` with the header and bytes on stdin."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

SOURCE = (Path(__file__).resolve().parents[2] / "src" / "remote_scripts" / "gs_receive.py").read_text()


def _run(directory: Path, mode: str, stdin: bytes) -> tuple[int, dict]:
    res = subprocess.run(
        [sys.executable, "-c", SOURCE, str(directory), mode], input=stdin, capture_output=True, timeout=60
    )
    return res.returncode, json.loads(res.stdout.decode().strip().splitlines()[-1])


def _entry(name: str, data: bytes, mode: int = 0o600, sha: str | None = None) -> dict:
    return {"name": name, "size": len(data), "sha256": sha or hashlib.sha256(data).hexdigest(), "mode": mode}


def _stream(files: list[tuple[dict, bytes]]) -> bytes:
    return json.dumps({"files": [e for e, _ in files]}).encode() + b"\n" + b"".join(d for _, d in files)


def _private(tmp_path: Path) -> Path:
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    return d


def test_files_arrive_with_their_modes_and_then_check(tmp_path: Path) -> None:
    d = _private(tmp_path)
    tool, script = os.urandom(300_000), b"print('hi')\n"
    files = [(_entry("s5cmd", tool, 0o700), tool), (_entry("snapshot.py", script), script)]
    assert _run(d, "receive", _stream(files)) == (0, {"ok": True, "files": 2})
    assert (d / "s5cmd").read_bytes() == tool and stat.S_IMODE((d / "s5cmd").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "snapshot.py").stat().st_mode) == 0o600
    assert sorted(os.listdir(d)) == ["s5cmd", "snapshot.py"]  # no partial files left
    assert _run(d, "check", _stream([(e, b"") for e, _ in files]))[0] == 0
    (d / "s5cmd").write_bytes(tool[:-1] + b"X")  # changed after arrival
    code, answer = _run(d, "check", _stream([(e, b"") for e, _ in files]))
    assert code == 1 and "SHA-256" in answer["error"]


def test_a_wrong_digest_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    d = _private(tmp_path)
    data = os.urandom(1000)
    code, answer = _run(d, "receive", _stream([(_entry("s5cmd", data, 0o700, sha="ab" * 32), data)]))
    assert code == 1 and "arrived with SHA-256" in answer["error"]
    assert os.listdir(d) == []


def test_short_and_over_long_streams_are_refused(tmp_path: Path) -> None:
    d = _private(tmp_path)
    data = os.urandom(1000)
    code, answer = _run(d, "receive", _stream([(_entry("f", data), data[:500])]))
    assert code == 1 and "short" in answer["error"] and os.listdir(d) == []
    code, answer = _run(d, "receive", _stream([(_entry("f", data), data + b"more")]))
    assert code == 1 and "more bytes" in answer["error"]


def test_a_directory_open_to_others_or_a_symlink_is_refused(tmp_path: Path) -> None:
    data = b"x"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    code, answer = _run(shared, "receive", _stream([(_entry("f", data), data)]))
    assert code == 1 and "0700" in answer["error"] and os.listdir(shared) == []
    link = tmp_path / "link"
    link.symlink_to(_private(tmp_path))
    code, answer = _run(link, "receive", _stream([(_entry("f", data), data)]))
    assert code == 1 and "not a directory" in answer["error"]


def test_hostile_names_and_headers_are_refused(tmp_path: Path) -> None:
    d = _private(tmp_path)
    (tmp_path / "outside").write_bytes(b"keep")
    for name in ("../outside", "/etc/passwd", ".hidden", "a/b", "", "x" * 200):
        code, answer = _run(d, "receive", _stream([(_entry(name, b"evil"), b"evil")]))
        assert code == 1 and "bad file entry" in answer["error"], name
    for header in (b"not json\n", b'{"files": "x"}\n', b'{"files": [{"name": "f", "size": -1}]}\n', b""):
        assert _run(d, "receive", header)[0] == 1
    assert os.listdir(d) == [] and (tmp_path / "outside").read_bytes() == b"keep"


def test_a_symlink_planted_at_the_partial_name_is_not_followed(tmp_path: Path) -> None:
    d = _private(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (d / ".f.partial").symlink_to(victim)
    data = b"new content"
    assert _run(d, "receive", _stream([(_entry("f", data), data)]))[0] == 0
    assert victim.read_bytes() == b"keep" and (d / "f").read_bytes() == data
