"""A scripted GPU host with the interface of `src.adapters.remote_host.SshClient` / `RemoteSession`.

Tests configure it, run the code under test, then assert on its recorded state:

    fake = FakeSshClient(scripts={"snapshot": [{"event": "started", "pid": 1, "pgid": 1},
                                               {"event": "result", "parts": 3}]})
    ...
    assert fake.opened[0].pinned_host_key is None           # first use
    assert fake.script_calls[0].params["s3"]["bucket"] == "b"

A script may also be a callable `(params) -> list of steps`, for a host whose answer depends on what
it is asked (probe_host before and after a file was shipped). A script's list may hold an exception instance: it is raised when the run reaches that step (e.g.
`SshConnectionLost("dropped")` after two progress events). Setting the `cancel` event makes the next
step raise `RemoteCancelled`, like the real session after it killed the process group.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import shlex
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from src.adapters.remote_errors import HostKeyMismatch, RemoteCancelled
from src.adapters.remote_types import CommandResult, SshTarget, normalize_host_key
from src.adapters.script_upload import UploadFile
from src.adapters.ssh_policy import SshPolicy


def fake_host_key(seed: str) -> str:
    """A well-formed, deterministic ed25519 public key line ("ssh-ed25519 AAAA...") for `seed`."""
    raw = hashlib.sha256(seed.encode()).digest()
    blob = b"".join(struct.pack(">I", len(part)) + part for part in (b"ssh-ed25519", raw))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}"


FAKE_HOST_KEY = fake_host_key("fake-gpu-host")

# What probe_host.py answers on a host that has a recent s5cmd on its PATH (the jobs' first call).
HOST_WITH_S5CMD = [
    {"event": "started", "pid": 2, "pgid": 2},
    {
        "event": "result",
        "machine": "x86_64",
        "s5cmd_path": "/usr/local/bin/s5cmd",
        "s5cmd_version": "v2.3.0-991c9fb",
        "s5cmd_sha256": None,
    },
]


@dataclass
class ScriptCall:
    """One `run_script` call as the fake saw it (params deep-copied at call time)."""

    target: SshTarget
    name: str
    params: dict[str, Any]
    deadline_s: float | None
    idle_timeout_s: float | None
    events_yielded: int = 0
    cancelled: bool = False


@dataclass
class FakeRemoteSession:
    """What `FakeSshClient.open` returns. `closed` turns True on `close()` (idempotent)."""

    client: FakeSshClient
    target: SshTarget
    host_key: str
    closed: bool = False
    commands: list[list[str]] = field(default_factory=list)

    def __enter__(self) -> FakeRemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, command: list[str], *, timeout: float, cancel: threading.Event | None = None) -> CommandResult:
        self._check_open()
        if cancel is not None and cancel.is_set():
            raise RemoteCancelled(f"command {command[0]!r} was cancelled")
        self.commands.append(list(command))
        self.client.commands.append(list(command))
        return self.client.command_results.get(shlex.join(command), CommandResult(0, "", ""))

    def run_script(
        self,
        name: str,
        params: dict[str, Any],
        *,
        cancel: threading.Event | None = None,
        deadline_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        self._check_open()
        if name not in self.client.scripts:
            raise ValueError(f"no remote script named {name!r}")
        call = ScriptCall(
            target=self.target,
            name=name,
            params=copy.deepcopy(params),
            deadline_s=deadline_s,
            idle_timeout_s=idle_timeout_s,
        )
        self.client.script_calls.append(call)
        steps = self.client.scripts[name]
        return self._steps(call, list(steps(copy.deepcopy(params)) if callable(steps) else steps), cancel)

    def put_file(self, name: str, data: bytes, *, mode: int = 0o600) -> str:
        """Like RemoteSession.put_file: the file lands in the session's private directory."""
        self._check_open()
        UploadFile(name, bytes(data), mode)  # the same name and mode rules (ValueError)
        self.client.files[name] = (bytes(data), mode)
        return f"/tmp/gpusnap.fake/{name}"

    def close(self) -> None:
        self.closed = True

    def _steps(self, call: ScriptCall, steps: list[Any], cancel: threading.Event | None) -> Iterator[dict[str, Any]]:
        for step in steps:
            if cancel is not None and cancel.is_set():
                call.cancelled = True
                raise RemoteCancelled(f"remote script {call.name} was cancelled")
            if isinstance(step, BaseException):
                raise step
            call.events_yielded += 1
            yield copy.deepcopy(step)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("FakeRemoteSession used after close()")


class FakeSshClient:
    """Opens `FakeRemoteSession`s. Every attribute is plain state a test may set or assert on."""

    def __init__(
        self,
        *,
        scripts: dict[str, list[Any]] | None = None,
        host_key: str = FAKE_HOST_KEY,
        policy: SshPolicy | None = None,
    ) -> None:
        # probe_host answers "s5cmd is here" unless a test scripts it otherwise
        self.scripts: dict[str, Any] = {"probe_host": HOST_WITH_S5CMD, **(scripts or {})}
        self.host_key = host_key  # what the "server" presents; change it to simulate a new machine
        self.policy = policy  # checked like the real client: a refused host is never "connected"
        self.fail_next_opens: list[BaseException] = []  # raised by the next open() calls, in order
        self.command_results: dict[str, CommandResult] = {}  # keyed by shlex.join(argv)
        self.opened: list[SshTarget] = []  # every target a connection was attempted to
        self.sessions: list[FakeRemoteSession] = []  # sessions handed out (authenticated)
        self.script_calls: list[ScriptCall] = []
        self.commands: list[list[str]] = []
        self.files: dict[str, tuple[bytes, int]] = {}  # put_file: name -> (bytes, mode)

    def open(self, target: SshTarget, *, cancel: threading.Event | None = None) -> FakeRemoteSession:
        if self.policy is not None:
            self.policy.check(target.host)
        self.opened.append(target)
        if self.fail_next_opens:
            raise self.fail_next_opens.pop(0)
        presented = normalize_host_key(self.host_key)
        pinned = target.pinned_host_key
        if pinned is not None and pinned != presented:
            raise HostKeyMismatch(host=target.host, port=target.port, expected=pinned, presented=presented)
        session = FakeRemoteSession(client=self, target=target, host_key=presented)
        self.sessions.append(session)
        return session
