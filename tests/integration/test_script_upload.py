"""Uploads into a session's private directory against the real loopback sshd, with and without the
SFTP subsystem: the real remote scripts arrive either way, a shipped binary keeps its digest and mode,
and a directory that is not private is refused."""

from __future__ import annotations

import hashlib
import os
import stat
import sys

import pytest

from src.adapters.remote_host import ScriptUploadFailed, SshClient, SshPolicy, SshTarget
from src.jobs.host_tools import local_s5cmd


def _open(server):  # type: ignore[no-untyped-def]
    client = SshClient(
        server.client_key_path,
        policy=SshPolicy.from_setting("127.0.0.1/32"),
        connect_timeout=5,
        ready_retries=0,
        remote_python=sys.executable,
    )
    return client.open(SshTarget(host=server.host, port=server.port, user=server.user))


@pytest.mark.parametrize("sftp", [True, False])
def test_scripts_and_a_shipped_binary_arrive_intact(sshd_factory, sftp) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory(sftp=sftp)
    tool = local_s5cmd()
    with _open(server) as session:
        events = list(session.run_script("probe_host", {"s5cmd": "no-such-s5cmd"}))
        assert events[-1]["event"] == "result" and events[-1]["s5cmd_path"] is None
        assert session._uploader.last_method == ("sftp" if sftp else "exec")
        remote_dir = session.remote_dir
        assert stat.S_IMODE(os.stat(remote_dir).st_mode) == 0o700
        path = session.put_file("s5cmd", tool.data, mode=0o700)
        assert path == f"{remote_dir}/s5cmd" and stat.S_IMODE(os.stat(path).st_mode) == 0o700
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == tool.sha256
        check = list(session.run_script("probe_host", {"s5cmd": path, "sha256": True}))[-1]
        assert check["s5cmd_sha256"] == tool.sha256 and check["s5cmd_version"].startswith("v2.")
        assert check["machine"] == os.uname().machine
        for name in os.listdir(remote_dir):
            assert not name.startswith("."), name  # no partial upload left behind
    assert not os.path.exists(remote_dir)  # removed with the session


@pytest.mark.parametrize("sftp", [True, False])
def test_a_private_directory_opened_to_others_is_refused(sshd_factory, sftp) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory(sftp=sftp)
    with _open(server) as session:
        list(session.run_script("probe_host", {"s5cmd": "s5cmd"}))
        os.chmod(session.remote_dir, 0o755)  # someone widened it between two uploads
        with pytest.raises(ScriptUploadFailed, match="0700"):
            session.put_file("s5cmd", b"\x7fELF not really", mode=0o700)


def test_a_remote_python_that_is_not_there_is_named(sshd_factory) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory(sftp=False)
    client = SshClient(
        server.client_key_path,
        policy=SshPolicy.from_setting("127.0.0.1/32"),
        connect_timeout=5,
        ready_retries=0,
        remote_python="/nonexistent/python3",
    )
    with client.open(SshTarget(host=server.host, port=server.port, user=server.user)) as session:
        with pytest.raises(ScriptUploadFailed, match="REMOTE_PYTHON"):
            list(session.run_script("probe_host", {"s5cmd": "s5cmd"}))


def test_an_sftp_that_cannot_write_falls_back_to_the_exec_channel(sshd_factory) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory(sftp_read_only=True)  # answers SFTP, refuses every write
    with _open(server) as session:
        events = list(session.run_script("probe_host", {"s5cmd": "s5cmd"}))
        assert events[-1]["event"] == "result"
        assert session._uploader.sftp_available is False and session._uploader.last_method == "exec"
        path = session.put_file("tool", b"payload", mode=0o700)
        with open(path, "rb") as f:
            assert f.read() == b"payload"
