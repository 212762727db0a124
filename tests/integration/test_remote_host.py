"""The SSH adapter against a real OpenSSH server on 127.0.0.1 (the loopback sshd fixture)."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from src.adapters.remote_host import (
    HostKeyMismatch,
    RemoteCancelled,
    RemoteStateUnknown,
    RemoteTimeout,
    ScriptUploadFailed,
    SshAuthFailed,
    SshClient,
    SshConnectionLost,
    SshPolicy,
    SshTarget,
    SshUnreachable,
    TargetNotAllowed,
)
from src.adapters.remote_session import RemoteSession, _ScriptRun, _valid_pgid
from tests.fakes.fake_remote_host import FakeRemoteSession, FakeSshClient
from tests.support.silent_ssh_server import SilentSshServer
from tests.support.sshd import LoopbackSshd, processes, write_key_pair
from tests.support.tcp_relay import TcpRelay

SECRET = "S3CR3T-not-a-real-key-7f3a91c2"

# Small stand-ins for src/remote_scripts: same protocol (JSON on stdin, JSON lines on stdout).
SCRIPTS = {
    "__init__.py": "raise SystemExit('__init__.py must not be uploaded')\n",
    "gs_testhelper.py": "def shout(text):\n    return text.upper()\n",
    "events.py": """
        import json, os, sys
        import gs_testhelper
        params = json.load(sys.stdin)
        def emit(**event): print(json.dumps(event), flush=True)
        emit(event="started", pid=os.getpid(), pgid=os.getpgrp())
        print("chatter that is not an event", flush=True)
        print("[1, 2, 3]", flush=True)
        sys.stderr.write("diagnostic on stderr\\n"); sys.stderr.flush()
        for i in range(params["n"]):
            emit(event="progress", i=i)
        emit(event="result", label=gs_testhelper.shout(params["label"]))
    """,
    "fail.py": """
        import json, os, sys
        json.load(sys.stdin)
        print(json.dumps({"event": "started", "pid": os.getpid(), "pgid": os.getpgrp()}), flush=True)
        sys.stderr.write("x" * 8000 + "\\nboom: disk on fire\\n")
        sys.exit(3)
    """,
    "own_error.py": """
        import json, sys
        json.load(sys.stdin)
        print(json.dumps({"event": "error", "code": "bad_config", "message": "no workspace"}), flush=True)
        sys.exit(2)
    """,
    "slow.py": """
        import hashlib, json, os, subprocess, sys, time
        params = json.load(sys.stdin)
        def emit(**event): print(json.dumps(event), flush=True)
        emit(event="started", pid=os.getpid(), pgid=os.getpgrp())
        kids = [subprocess.Popen(["sleep", "300"]) for _ in range(params.get("children", 0))]
        secret = params.get("s3", {}).get("secret_key", "")
        emit(event="children", pids=[k.pid for k in kids], secret_sha256=hashlib.sha256(secret.encode()).hexdigest())
        end = time.monotonic() + params.get("seconds", 300)
        while time.monotonic() < end:
            time.sleep(0.1)
            if not params.get("silent"):
                emit(event="progress")
        emit(event="result")
    """,
}


@pytest.fixture(scope="module")
def scripts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scripts")
    for name, body in SCRIPTS.items():
        (folder / name).write_text(textwrap.dedent(body).lstrip())
    return folder


@pytest.fixture
def make_client(scripts_dir: Path) -> Callable[..., SshClient]:
    def make(server: LoopbackSshd, **overrides: object) -> SshClient:
        options: dict = {
            "policy": SshPolicy.from_setting("127.0.0.1/32"),
            "connect_timeout": 3,
            "ready_retries": 0,
            "remote_python": sys.executable,
            "scripts_dir": scripts_dir,
        }
        key_path = overrides.pop("key_path", server.client_key_path)
        options.update(overrides)
        return SshClient(key_path, **options)  # type: ignore[arg-type]

    return make


def target_of(server: LoopbackSshd, *, pinned: str | None = None) -> SshTarget:
    return SshTarget(host=server.host, port=server.port, user=server.user, pinned_host_key=pinned)


def live_group_members(pgid: int) -> list[int]:
    """Processes in `pgid` that are not zombies (PID 1 here may never reap orphans)."""
    return [pid for pid, fields in processes() if int(fields[2]) == pgid and fields[0] != "Z"]


def wait_gone(pgid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (members := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return members


def accepted_logins(server: LoopbackSshd) -> int:
    return server.log_path.read_text().count("Accepted publickey")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain TCP listener that records whether anyone connected."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    sock.settimeout(0.3)
    yield sock
    sock.close()


def assert_nobody_connected(sock: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        sock.accept()


# --- host keys and authentication -------------------------------------------------------------------


def test_first_use_returns_the_presented_host_key(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        assert session.host_key == sshd.host_public_key
        assert session.run(["echo", "hello world"], timeout=5).stdout == "hello world\n"


def test_pinned_key_that_matches_works(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd, pinned=sshd.host_public_key + " comment")) as session:
        result = session.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=5)
    assert (result.exit_status, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_changed_host_key_is_refused_before_anything_runs(sshd_factory, make_client, tmp_path: Path) -> None:
    server = sshd_factory()
    client = make_client(server)
    with client.open(target_of(server)) as session:
        pin = session.host_key
    logins = accepted_logins(server)
    server.restart_with_new_host_key()
    marker = tmp_path / "marker"

    with pytest.raises(HostKeyMismatch) as info:
        with client.open(target_of(server, pinned=pin)) as session:
            session.run(["touch", str(marker)], timeout=5)

    assert info.value.code == "host_key_mismatch" and not info.value.retryable
    assert info.value.expected == pin and info.value.presented == server.host_public_key
    assert not marker.exists()
    assert accepted_logins(server) == logins  # we never even authenticated


def test_wrong_client_key_is_an_auth_failure(sshd: LoopbackSshd, make_client, tmp_path: Path) -> None:
    other_key = tmp_path / "other_ed25519"
    write_key_pair(other_key)
    with pytest.raises(SshAuthFailed) as info:
        make_client(sshd, key_path=other_key).open(target_of(sshd))
    assert info.value.code == "ssh_auth_failed" and not info.value.retryable


def test_unreadable_key_fails_before_connecting(sshd, make_client, listener: socket.socket, tmp_path: Path) -> None:
    with pytest.raises(SshAuthFailed, match="cannot load"):
        make_client(sshd, key_path=tmp_path / "missing").open(
            SshTarget(host="127.0.0.1", port=listener.getsockname()[1])
        )
    assert_nobody_connected(listener)


# --- reaching the host ------------------------------------------------------------------------------


def test_retries_until_sshd_comes_up(sshd_factory, make_client) -> None:
    server = sshd_factory(start=False)
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:
        with make_client(server, ready_retries=10, ready_deadline=20).open(target_of(server)) as session:
            assert session.host_key == server.host_public_key
    finally:
        starter.join()


def test_gives_up_when_sshd_never_comes_up(sshd_factory, make_client) -> None:
    server = sshd_factory(start=False)
    started = time.monotonic()
    with pytest.raises(SshUnreachable) as info:
        make_client(server, ready_retries=2, ready_deadline=20).open(target_of(server))
    assert info.value.code == "ssh_unreachable" and info.value.retryable
    assert 1.0 < time.monotonic() - started < 5  # backoff 0.5 s then 1 s


def test_refused_target_is_never_connected_to(make_client, sshd: LoopbackSshd, listener: socket.socket) -> None:
    client = make_client(sshd, policy=SshPolicy.from_setting("10.0.0.0/8,gpu.example.com"))
    port = listener.getsockname()[1]
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(TargetNotAllowed) as info:
            client.open(SshTarget(host=host, port=port))
        assert info.value.code == "target_not_allowed"
    assert_nobody_connected(listener)


def test_address_is_checked_again_at_connect_time(make_client, sshd: LoopbackSshd, listener: socket.socket) -> None:
    # The pre-check is fooled (DNS said 10.0.0.5) but the name really resolves to 127.0.0.1 now.
    fooled = SshPolicy.from_setting("10.0.0.0/8", resolver=lambda host: ["10.0.0.5"])
    with pytest.raises(TargetNotAllowed):
        make_client(sshd, policy=fooled).open(SshTarget(host="localhost", port=listener.getsockname()[1]))
    assert_nobody_connected(listener)


def test_unreachable_hosts_all_fail_alike(make_client, sshd: LoopbackSshd, caplog) -> None:
    """No port-scan oracle: closed port, open port that never speaks, a non-SSH service and a name that
    does not resolve give the same code and the same message (the worker log keeps the cause)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(5)  # accepts, never sends a banner
    chatty = socket.socket()
    chatty.bind(("127.0.0.1", 0))
    chatty.listen(5)

    def answer_http() -> None:
        conn, _ = chatty.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    client = make_client(sshd, policy=SshPolicy.from_setting("*"), banner_timeout=1.0, connect_timeout=1.0)
    targets = [
        ("127.0.0.1", closed_port),
        ("127.0.0.1", mute.getsockname()[1]),
        ("127.0.0.1", chatty.getsockname()[1]),
        ("no-such-host.invalid", 22),
    ]
    try:
        for host, port in targets:
            with caplog.at_level(logging.WARNING), pytest.raises(SshUnreachable) as info:
                client.open(SshTarget(host=host, port=port))
            assert info.value.code == "ssh_unreachable"
            assert info.value.message == f"cannot reach an SSH server at {host}:{port}"
    finally:
        mute.close()
        chatty.close()
    assert "refused" in caplog.text.lower()  # the details stay in the log


# --- running scripts --------------------------------------------------------------------------------


def test_run_script_streams_events_in_order(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        events = list(session.run_script("events", {"n": 5, "label": "ok"}))
        remote_dir = session.remote_dir
        listing = session.run(["ls", "-a", remote_dir], timeout=5).stdout.split()
        mode = session.run(["stat", "-c", "%a", remote_dir], timeout=5).stdout.strip()
        again = list(session.run_script("events", {"n": 0, "label": "again"}))
        assert session.remote_dir == remote_dir  # uploaded once per session
    assert [e["event"] for e in events] == ["started"] + ["progress"] * 5 + ["result"]
    assert [e["i"] for e in events if e["event"] == "progress"] == list(range(5))
    assert events[-1]["label"] == "OK"  # the helper module was uploaded beside it
    assert again[-1]["label"] == "AGAIN"
    listing.remove("__pycache__")  # python caching the helper's bytecode; removed with the directory
    assert sorted(listing) == [".", "..", "events.py", "fail.py", "gs_testhelper.py", "own_error.py", "slow.py"]
    assert mode == "700"
    assert not Path(remote_dir).exists()  # removed on close


def test_non_zero_exit_yields_a_synthesized_error(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        events = list(session.run_script("fail", {}))
        own = list(session.run_script("own_error", {}))
    assert [e["event"] for e in events] == ["started", "error"]
    error = events[-1]
    assert error["code"] == "remote_exit"
    assert error["message"].startswith("exit status 3:") and "boom: disk on fire" in error["message"]
    assert len(error["message"]) < 4200  # only the stderr tail
    assert own == [{"event": "error", "code": "bad_config", "message": "no workspace"}]


def test_params_never_reach_argv_or_logs(sshd: LoopbackSshd, make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    params = {"s3": {"access_key": "AK", "secret_key": SECRET}, "seconds": 1.0}
    seen_in_proc: list[str] = []
    with make_client(sshd).open(target_of(sshd)) as session:
        events = []
        for event in session.run_script("slow", params):
            events.append(event)
            for path in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if SECRET.encode() in path.read_bytes():
                        seen_in_proc.append(str(path))
                except OSError:
                    continue
        uploaded = session.run(["sh", "-c", f"cat {session.remote_dir}/*"], timeout=5).stdout
    assert len([e for e in events if e["event"] == "progress"]) >= 3  # we polled while it ran
    assert events[1]["secret_sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()  # it did get it
    assert seen_in_proc == []
    assert SECRET not in uploaded
    assert "ssh session open" in caplog.text, "our logs were not captured: the check below would prove nothing"
    assert SECRET not in caplog.text


def test_cancel_kills_the_remote_process_group(sshd: LoopbackSshd, make_client) -> None:
    cancel = threading.Event()
    with make_client(sshd).open(target_of(sshd)) as session:
        stream = session.run_script("slow", {"children": 2, "seconds": 60}, cancel=cancel)
        started = next(stream)
        children = next(stream)["pids"]
        assert live_group_members(started["pgid"]) != []
        cancel.set()
        began = time.monotonic()
        with pytest.raises(RemoteCancelled) as info:
            list(stream)
        assert time.monotonic() - began < 4
        assert info.value.code == "cancelled"
        assert session.run(["true"], timeout=5).ok  # the session is still usable
    assert wait_gone(started["pgid"]) == []
    assert all(pid not in live_group_members(started["pgid"]) for pid in children)


def test_cancel_set_before_the_start_launches_nothing(sshd: LoopbackSshd, make_client) -> None:
    cancel = threading.Event()
    cancel.set()
    with make_client(sshd).open(target_of(sshd)) as session:
        with pytest.raises(RemoteCancelled, match="before it started"):
            list(session.run_script("events", {"n": 1, "label": "x"}, cancel=cancel))


def test_closing_the_stream_early_kills_the_group(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        stream = session.run_script("slow", {"children": 1, "seconds": 60})
        started = next(stream)
        stream.close()
    assert wait_gone(started["pgid"]) == []


def test_dropped_connection_mid_run_is_connection_lost(sshd_factory, make_client) -> None:
    server = sshd_factory()
    with make_client(server).open(target_of(server)) as session:
        stream = session.run_script("slow", {"seconds": 30})
        started = next(stream)
        remote_dir = session.remote_dir
        server.drop_connections()
        with pytest.raises(SshConnectionLost) as info:
            list(stream)
    assert info.value.code == "ssh_connection_lost" and info.value.retryable
    assert wait_gone(started["pgid"]) == []  # killed over a fresh connection (or SIGPIPE got it first)
    assert not Path(remote_dir).exists()  # the fresh connection also removed the scripts


def test_deadline_and_idle_timeout_kill_the_script(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        # Limits of a few seconds: the script's Python must start first, on a machine that may be busy.
        stream = session.run_script("slow", {"seconds": 60}, deadline_s=3.0)
        with pytest.raises(RemoteTimeout, match="ran past 3s") as info:
            pgid = next(stream)["pgid"]
            list(stream)
        assert info.value.code == "remote_timeout"
        assert wait_gone(pgid) == []

        stream = session.run_script("slow", {"seconds": 60, "silent": True}, idle_timeout_s=3.0)
        with pytest.raises(RemoteTimeout, match="silent"):
            pgid = next(stream)["pgid"]
            next(stream)  # the `children` line
            next(stream)
        assert wait_gone(pgid) == []

        with pytest.raises(RemoteTimeout):
            session.run(["sleep", "5"], timeout=0.5)


def test_a_failed_upload_is_redone_by_the_next_run(sshd: LoopbackSshd, make_client, tmp_path: Path) -> None:
    for name, body in SCRIPTS.items():
        (tmp_path / name).write_text(textwrap.dedent(body).lstrip())
    broken = tmp_path / "a_unreadable.py"  # sorted first, so nothing else is uploaded before it fails
    broken.symlink_to(tmp_path / "missing")
    with make_client(sshd, scripts_dir=tmp_path).open(target_of(sshd)) as session:
        with pytest.raises(ScriptUploadFailed):
            list(session.run_script("events", {"n": 0, "label": "x"}))
        broken.unlink()
        broken.write_text("")
        events = list(session.run_script("events", {"n": 0, "label": "retried"}))
    assert events[-1] == {"event": "result", "label": "RETRIED"}


def test_unknown_script_name_is_refused(sshd: LoopbackSshd, make_client) -> None:
    with make_client(sshd).open(target_of(sshd)) as session:
        for name in ("nope", "../etc/passwd", "__init__", "events.py"):
            with pytest.raises(ValueError):
                session.run_script(name, {})


@pytest.mark.parametrize(("real", "fake"), [(SshClient, FakeSshClient), (RemoteSession, FakeRemoteSession)])
def test_fake_offers_the_same_methods(real: type, fake: type) -> None:
    """Unit tests use the fake; it must accept every call the real adapter accepts."""
    for name in ("open", "run", "run_script", "close", "__enter__", "__exit__"):
        if not hasattr(real, name):
            continue
        real_params = inspect.signature(getattr(real, name)).parameters
        fake_params = inspect.signature(getattr(fake, name)).parameters
        assert list(real_params) == list(fake_params), name
        for param in real_params.values():
            assert fake_params[param.name].kind == param.kind, (name, param.name)


# --- silent hosts and dead links (issues 9 and 14) ----------------------------------------------------


def test_a_host_silent_on_exec_times_out_and_cancels(make_client, sshd: LoopbackSshd) -> None:
    with SilentSshServer(authorized_key_path=sshd.client_key_path, mode="exec") as silent:
        target = SshTarget(host=silent.host, port=silent.port)
        with make_client(sshd).open(target) as session:
            began = time.monotonic()
            with pytest.raises(RemoteTimeout):
                session.run(["true"], timeout=1.0)
            assert time.monotonic() - began < 4
        cancel = threading.Event()
        with make_client(sshd).open(target, cancel=cancel) as session:
            threading.Timer(0.5, cancel.set).start()
            began = time.monotonic()
            with pytest.raises(RemoteCancelled):
                list(session.run_script("events", {"n": 1, "label": "x"}))  # the session's cancel applies
            assert time.monotonic() - began < 3
        assert silent.exec_requests  # it was the exec that hung, not the login


def test_a_host_silent_on_sftp_is_bounded(make_client, sshd: LoopbackSshd) -> None:
    with SilentSshServer(authorized_key_path=sshd.client_key_path, mode="sftp") as silent:
        client = make_client(sshd, upload_timeout=1.0)
        with client.open(SshTarget(host=silent.host, port=silent.port)) as session:
            began = time.monotonic()
            with pytest.raises(RemoteTimeout, match="script upload"):
                list(session.run_script("events", {"n": 1, "label": "x"}))
            assert time.monotonic() - began < 4
        assert silent.subsystem_requests == ["sftp"]


def test_cancel_while_connecting_returns_at_once(make_client, sshd: LoopbackSshd) -> None:
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(5)  # never sends a banner
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    began = time.monotonic()
    try:
        with pytest.raises(RemoteCancelled):
            make_client(sshd, ready_retries=None, ready_deadline=60).open(
                SshTarget(host="127.0.0.1", port=mute.getsockname()[1]), cancel=cancel
            )
    finally:
        mute.close()
    assert time.monotonic() - began < 3


def test_black_holed_link_kills_the_script_over_a_fresh_connection(make_client, sshd: LoopbackSshd) -> None:
    with TcpRelay((sshd.host, sshd.port)) as relay:
        client = make_client(sshd, cleanup_timeout=6)
        with client.open(SshTarget(host=relay.host, port=relay.port, user=sshd.user)) as session:
            stream = session.run_script("slow", {"seconds": 60, "children": 1, "silent": True}, idle_timeout_s=3.0)
            pgid = next(stream)["pgid"]
            next(stream)  # children started
            remote_dir = session.remote_dir
            relay.blackhole()
            with pytest.raises(RemoteTimeout):
                list(stream)
        assert live_group_members(pgid) == []  # confirmed before the error was raised
        assert relay.connections == 2 and not Path(remote_dir).exists()


def test_no_way_back_to_a_host_is_remote_state_unknown(make_client, sshd: LoopbackSshd) -> None:
    with TcpRelay((sshd.host, sshd.port)) as relay:
        client = make_client(sshd, cleanup_timeout=3)
        with client.open(SshTarget(host=relay.host, port=relay.port, user=sshd.user)) as session:
            stream = session.run_script("slow", {"seconds": 60, "silent": True}, idle_timeout_s=3.0)
            pgid = next(stream)["pgid"]
            remote_dir = session.remote_dir
            relay.blackhole(new_connections=True)
            began = time.monotonic()
            try:
                with pytest.raises(RemoteStateUnknown) as info:
                    list(stream)
                assert time.monotonic() - began < 25
                assert info.value.code == "remote_state_unknown" and not info.value.retryable
                assert info.value.pgid == pgid and info.value.cause.code == "remote_timeout"
                assert live_group_members(pgid) != []  # it really is still running: the error is honest
            finally:
                os.killpg(pgid, signal.SIGKILL)
                shutil.rmtree(remote_dir or "/nonexistent", ignore_errors=True)


def test_hostile_started_events_never_aim_the_kill_elsewhere(make_client, sshd: LoopbackSshd) -> None:
    """A pgid that is not the script's own (1, 0, negative, a string, another live group) is never
    killed: the kill checks the group leader runs our script."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with make_client(sshd).open(target_of(sshd)) as session:
            for bogus in (1, 0, -5, "12", True, bystander.pid):
                run = _ScriptRun(name="slow", remote_dir=session.remote_dir or "/tmp/none", reader=None, output=None)  # type: ignore[arg-type]
                run.pgid = _valid_pgid(bogus)
                assert session._kill(session, run)  # nothing of ours runs: "gone" without killing anyone
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
