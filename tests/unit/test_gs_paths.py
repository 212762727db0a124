"""gs_paths: the restore deny list and the excludes that would empty a snapshot, with hostile spellings.
The same module answers for the control plane (src/services/path_policy.py) and the host (restore.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from src.errors import Unprocessable
from src.remote_scripts.gs_paths import denied_reason, excludes_everything, normalise
from src.services.path_policy import check_excludes, check_restore_path

DENIED = [
    "/",
    "//",
    "/etc",
    "//etc",
    "/etc/",
    "/etc/.",
    "/usr/../etc",
    "/./etc",
    "/etc/ssh",
    "/usr",
    "/usr/local/x",
    "/boot",
    "/bin",
    "/sbin",
    "/dev",
    "/dev/shm",
    "/proc",
    "/proc/self",
    "/sys",
    "/run",
    "/run/user/0",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/var",
    "/var/tmp/ws",
    "/var/lib/docker",
    "/snap",
    "/root",
    "/root/",
    "/root/.ssh",
    "/root/.ssh/keys",
    "/home",
    "/home/ubuntu",
    "/home/ubuntu/.ssh",
    "/workspace/.ssh",
    "/opt",
    "/srv",
    "/tmp",
    "/mnt",
    "/media",
    "/workspace/../etc",
    "/a/../../usr",
]
ALLOWED = [
    "/workspace",
    "/workspace/project",
    "/root/workspace",
    "/home/ubuntu/project",
    "/opt/app",
    "/srv/data",
    "/tmp/ws",
    "/mnt/volume",
    "/data",
    "/libfoo",
    "/etcetera",
    "/usrdata",
    "/workspace/.sshx",
    "/root/.ssh2",
]


@pytest.mark.parametrize("path", DENIED)
def test_system_paths_are_refused(path: str) -> None:
    assert denied_reason(path) is not None
    with pytest.raises(Unprocessable) as err:
        check_restore_path(path)
    assert err.value.code == "system_path" and err.value.http_status == 422


@pytest.mark.parametrize("path", ALLOWED)
def test_workspace_paths_are_allowed(path: str) -> None:
    assert denied_reason(path) is None
    assert check_restore_path(path) == path


def test_relative_paths_and_normalisation() -> None:
    assert denied_reason("etc") is not None
    assert normalise("//usr/./lib/../bin/") == "/usr/bin"


ROOT_MATCHING = [".", "*", "./", "/", "**", "", " ", ".*", "?", "[.]", "*.", "./*", ".[!.]*", "//", "./.", "*/*"]
FINE = [
    "*.tmp",
    "node_modules",
    ".cache",
    "./.*",
    "./.cache",
    "__pycache__",
    "*.ckpt",
    "data/*",
    "./sub/*",
    ".git",
    "*/",
    "checkpoints/old-*",
]


@pytest.mark.parametrize("pattern", ROOT_MATCHING)
def test_excludes_matching_the_root_are_refused(pattern: str) -> None:
    assert excludes_everything(pattern)
    with pytest.raises(Unprocessable) as err:
        check_excludes(["*.tmp", pattern])
    assert err.value.code == "exclude_matches_root"


@pytest.mark.parametrize("pattern", FINE)
def test_ordinary_excludes_are_accepted(pattern: str) -> None:
    assert not excludes_everything(pattern)
    assert check_excludes([pattern]) == [pattern]


@pytest.mark.parametrize(
    "pattern", [p for p in ROOT_MATCHING if p.strip() not in ("", "./", "/", "//", "./.")] + ["*.tmp", ".cache", "./.*"]
)
def test_the_rule_agrees_with_gnu_tar(pattern: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What GNU tar itself leaves out: a pattern refused here makes tar write no entry at all below the root."""
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    for name in ("a.bin", ".hidden", "sub/c.txt", ".cache"):
        (ws / name).write_text("x")
    names = subprocess.run(
        f"tar -C {ws} -cf - --format=posix --exclude='{pattern}' . | tar -tf -",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    children = [n for n in names if n not in ("./", ".")]
    assert (children == []) == excludes_everything(pattern), (pattern, names)
    assert os.path.isdir(ws)
