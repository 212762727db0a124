"""pytest fixtures for a real S3 server (SeaweedFS), registered by tests/conftest.py.

`s3_server` (session): an object with endpoint, access_key, secret_key, region, bucket.
`s3_client` (function): a boto3 client of that server.
`s3_prefix` (function): a unique key prefix ending in '/', so tests never see each other's objects.
`held_bucket` (function): a SlowS3Proxy in front of that server; a test calls `hold_puts_after(n)` to stop
an upload after n objects, whatever the machine's speed, acts, then `release_puts()`.
Plus plain helpers for running the remote data-plane scripts against that server (script_config,
start_script/finish_script/run_script, tree_state).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3_server import S3Endpoint, SeaweedS3Server, s5cmd_binary
from tests.support.slow_s3_proxy import SlowS3Proxy


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    server = SeaweedS3Server()
    try:
        info = server.start()
    except (OSError, RuntimeError) as exc:
        pytest.fail("could not start SeaweedFS for the S3 tests: %s" % exc)
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture
def held_bucket(s3_server: S3Endpoint) -> Iterator[SlowS3Proxy]:
    with SlowS3Proxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def s3_client(s3_server: S3Endpoint) -> Any:
    """A boto3 client of the test server: to look at or damage objects behind the scripts' back."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return "tests/%s-%s/" % (name, uuid.uuid4().hex[:10])


# --- helpers for the remote data-plane scripts (src/remote_scripts), used by tests/integration ---

REMOTE_SCRIPTS = Path(__file__).resolve().parents[2] / "src" / "remote_scripts"


@dataclass
class ScriptRun:
    """Outcome of one remote script run: parsed stdout events, exit status, stderr text."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1] if self.events else {}

    @property
    def error_code(self) -> str | None:
        return self.last.get("code") if self.last.get("event") == "error" else None


def script_config(s3: S3Endpoint, prefix: str, workspace: str, **extra: Any) -> dict[str, Any]:
    """A snapshot.py/restore.py stdin config against the test server (small parts by default)."""
    cfg: dict[str, Any] = {
        "workspace_path": workspace,
        "prefix": prefix,
        "snapshot_id": "snap-test",
        "instance_id": "inst-test",
        "codec": "zstd",
        "zstd_level": 3,
        "part_size": 64 * 1024,
        "parallelism": 4,
        "excludes": [],
        "s5cmd": s5cmd_binary(),
        "bootstrap": False,
        "s3": s3.script_s3(),
    }
    cfg.update(extra)
    return cfg


def start_script(name: str, config: Any) -> subprocess.Popen:
    """Start `src/remote_scripts/<name>.py` as the SSH adapter would: JSON on stdin, nothing in argv."""
    proc = subprocess.Popen(
        [sys.executable, str(REMOTE_SCRIPTS / (name + ".py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(config if isinstance(config, bytes) else json.dumps(config).encode())
    proc.stdin.close()
    proc.stdin = None  # so communicate() does not touch it again
    return proc


def finish_script(proc: subprocess.Popen, timeout: float = 120) -> ScriptRun:
    out, err = proc.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return ScriptRun(proc.returncode, events, err.decode("utf-8", "replace"))


def run_script(name: str, config: Any, timeout: float = 120) -> ScriptRun:
    return finish_script(start_script(name, config), timeout)


def tree_state(root: str) -> dict[bytes, tuple[Any, ...]]:
    """Everything a restore must preserve, per entry (bytes paths, so non-UTF-8 names compare):
    type+mode, uid/gid, size, mtime_ns, link target, content digest, hard-link group."""
    state: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, bytes] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else b""
            digest = ""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            group = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else b""
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            state[rel] = (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, link, digest, group)
    st = os.lstat(base)
    state[b"."] = (st.st_mode, st.st_uid, st.st_gid, 0, st.st_mtime_ns, b"", "", b"")
    return state
