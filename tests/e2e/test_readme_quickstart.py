"""The README's Quick start, pasted as is: its bash block, taken from README.md, runs in a copy of the
repository as a fresh clone has it, twice (pasting it again must work too), and gives a token and a
200 list. It runs in a network namespace of its own when it can (the block names localhost:5000, which
another test or service may hold here, and it shows the block needs no network once set up).

Set-up: `make setup` (the block's first line) installs the app with pip. So that this test does not
download every dependency again, the copy's venv is made first and sees this interpreter's packages
through a .pth file; `make setup` itself still runs (pip installs the copy in editable mode). With
GPUSNAP_QUICKSTART_FRESH_VENV=1 the venv is left to `make setup` entirely (minutes, with network)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Brings `lo` up in a new network namespace (no `ip` needed), then runs the command given.
LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH14s', b'lo', 0, bytes(14)))[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack('16sH14s', b'lo', flags | 0x1, bytes(14)))
os.execvp(sys.argv[1], sys.argv[1:])
"""


def quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Quick start\n") :]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "README.md's Quick start has no ```bash block"
    return match.group(1)


def _clone(dest: Path) -> None:
    """The files a clone would have: tracked ones, plus new ones not ignored (this branch's work)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name.decode())


def _seed_venv(clone: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True, timeout=300)
    pth = next((clone / ".venv" / "lib").glob("python3*/site-packages")) / "zz_gpusnap_test_deps.pth"
    pth.write_text("\n".join(site.getsitepackages()) + "\n")


def _netns_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", LOOPBACK_UP, "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _run_block(clone: Path, env: dict, log: Path, *, netns: bool) -> str:
    script = clone / "quickstart.sh"
    script.write_text(quickstart_block())
    command = ["bash", str(script)]
    if netns:
        command = ["unshare", "--net", sys.executable, "-c", LOOPBACK_UP, *command]
    with log.open("wb") as out:
        # The block leaves `make run` running in the background: output goes to a file (a pipe would stay
        # open), and the whole process group is stopped afterwards.
        proc = subprocess.Popen(
            command,
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while _live_in_group(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            for pid in _live_in_group(proc.pid):
                os.kill(pid, signal.SIGKILL)
    return log.read_text(errors="replace")


def _live_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (orphans here may never be reaped by PID 1)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_readme_quick_start_pasted_into_a_fresh_clone_works_twice(tmp_path):
    block = quickstart_block()
    assert "make setup" in block and "tokens create" in block and "make run &" in block
    clone = tmp_path / "gpusnap"
    clone.mkdir()
    _clone(clone)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GUNICORN_", "PROMETHEUS_"))
        and k
        not in ("DATABASE_URL", "REDIS_URL", "QUEUE_PATH", "API_TOKENS", "PYTHONPATH", "VIRTUAL_ENV", "GPUSNAP_TOKEN")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if not os.environ.get("GPUSNAP_QUICKSTART_FRESH_VENV"):
        _seed_venv(clone)
    # The block's first line, run before it (with network): inside the namespace it is then a no-op.
    setup = subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-3000:]
    netns = _netns_works()
    if not netns and not _port_free(5000):
        pytest.fail("no network namespace here and port 5000 is taken: the Quick start cannot be run")

    outputs = [_run_block(clone, env, tmp_path / f"run{i}.log", netns=netns) for i in (1, 2)]
    for output in outputs:
        assert "Traceback" not in output, output[-4000:]
        assert '"status":"ok"' in output.replace(" ", ""), output[-4000:]  # /readyz answered
        assert '{"items":[],"next_cursor":null}' in output.replace(" ", ""), output[-4000:]  # 200 list
        assert '"code":"unauthorized"' in output.replace(" ", ""), output[-4000:]  # 401 without the token
    assert (clone / "instance" / "gpusnap.db").exists()
    # The second paste replaced the token called "me": one token of that name, not an error.
    listed = subprocess.run(
        [str(clone / ".venv" / "bin" / "gpusnap"), "tokens", "ls"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and listed.stdout.count("me\t") == 1, listed.stdout + listed.stderr
