"""An authenticated SSH connection to one GPU host: run small commands and stream our remote scripts.

Scripts receive their parameters (which hold object-store credentials) as JSON on stdin, never in
argv, the environment or a file, and they are never logged here. Output is read by polling both
streams so deadlines hold even when the host goes silent; see `docs/ssh.md`.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paramiko

from src.adapters.remote_channel import ChannelReader, ScriptOutput
from src.adapters.remote_errors import (
    RemoteCancelled,
    RemoteTimeout,
    ScriptUploadFailed,
    SshConnectionLost,
)
from src.adapters.remote_types import CommandResult, SshTarget
from src.adapters.script_upload import ScriptUploader, UploadFile

logger = logging.getLogger(__name__)

_SCRIPT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KILL_GRACE_S = 5.0
_STDERR_TAIL_BYTES = 4096

# TERM the process group, wait until no live member is left (polling /proc, because `kill -0` also
# counts zombies, which linger forever in containers whose PID 1 never reaps), then KILL what remains.
# POSIX sh (dash has no `kill --`). Arguments: $1 = pgid, $2 = how many 0.1 s polls to wait.
_KILL_GROUP_SH = """pg=$1
alive() {
  for s in /proc/[0-9]*/stat; do
    read -r l 2>/dev/null < "$s" || continue
    set -- ${l##*) }
    [ "$3" = "$pg" ] && [ "$1" != Z ] && return 0
  done
  return 1
}
[ -r /proc/self/stat ] || alive() { kill -0 -"$pg" 2>/dev/null; }
kill -TERM -"$pg" 2>/dev/null
i=0
while alive && [ "$i" -lt "$2" ]; do sleep 0.1; i=$((i+1)); done
kill -KILL -"$pg" 2>/dev/null
true
"""


class RemoteSession:
    """One authenticated connection (from `SshClient.open`). Not thread-safe: use it from one thread;
    other threads may only set the `cancel` event handed to `run_script`. Close it (or use `with`)."""

    def __init__(
        self,
        *,
        transport: paramiko.Transport,
        target: SshTarget,
        host_key: str,
        remote_python: str,
        scripts_dir: Path,
        channel_timeout: float = 10.0,
    ) -> None:
        self._transport = transport
        self._target = target
        self._host_key = host_key
        self._python_argv = shlex.split(remote_python)
        self._scripts_dir = scripts_dir
        self._channel_timeout = channel_timeout
        self._remote_dir: str | None = None
        self._scripts_uploaded = False
        self._closed = False
        # SFTP, or an exec channel where the host has no SFTP subsystem; what arrives is hash-checked.
        self._uploader = ScriptUploader(transport=transport, host=target.host, python_argv=self._python_argv,
                                        channel_timeout=channel_timeout)

    @property
    def target(self) -> SshTarget:
        return self._target

    @property
    def host_key(self) -> str:
        """The host key the server presented ("ssh-ed25519 AAAA..."); store it as the pin on first use."""
        return self._host_key

    @property
    def remote_dir(self) -> str | None:
        """The private directory holding the uploaded scripts, once `run_script` has run."""
        return self._remote_dir

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, command: Sequence[str], *, timeout: float) -> CommandResult:
        """Run a small command (argv, each part shell-quoted; no PTY, empty stdin) and wait for it.

        Returns its exit status and output whatever the status. Not idempotent by itself: it runs the
        command. Raises `RemoteTimeout` past `timeout` seconds (the channel is closed; a command that
        ignores SIGPIPE may outlive it), `SshConnectionLost` when the connection dies.
        """
        if not command:
            raise ValueError("empty command")
        channel = self._exec(command)
        reader = ChannelReader(channel, transport=self._transport)
        stdout, stderr = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while not reader.finished:
                if time.monotonic() >= deadline:
                    raise RemoteTimeout(f"command {command[0]!r} on {self._target.host} ran past {timeout:g}s")
                out, err = reader.read(min(0.2, max(0.0, deadline - time.monotonic())))
                stdout += out
                stderr += err
            return CommandResult(
                exit_status=reader.exit_status(),
                stdout=stdout.decode("utf-8", "replace"),
                stderr=stderr.decode("utf-8", "replace"),
            )
        finally:
            channel.close()

    def run_script(
        self,
        name: str,
        params: dict[str, Any],
        *,
        cancel: threading.Event | None = None,
        deadline_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Run `<remote_python> <dir>/<name>.py` with `params` as JSON on stdin; yield its JSON events.

        The scripts folder is uploaded once per session to a `mktemp -d` directory. Events come in the
        order printed; a non-zero exit without an `error` event ends the stream with a synthesized
        `{"event": "error", "code": "remote_exit", ...}` carrying the stderr tail. Raises (while
        iterating) `RemoteCancelled` once `cancel` is set, `RemoteTimeout` past `deadline_s` or after
        `idle_timeout_s` without any output (both kill the remote process group first),
        `SshConnectionLost`, `ScriptUploadFailed`. Closing the iterator early also kills the group.
        `ValueError` (at call time) for an unknown script name or params that are not JSON.
        """
        if not _SCRIPT_NAME.match(name) or name == "__init__" or not (self._scripts_dir / f"{name}.py").is_file():
            raise ValueError(f"no remote script named {name!r} in {self._scripts_dir}")
        payload = json.dumps(params).encode() + b"\n"
        return self._stream(name, payload, cancel=cancel, deadline_s=deadline_s, idle_timeout_s=idle_timeout_s)

    def put_file(self, name: str, data: bytes, *, mode: int = 0o600) -> str:
        """Place `data` as `name` in the private directory (created and filled with the scripts first if
        need be), checked by SHA-256 on the host; returns its path there. Raises `ScriptUploadFailed`
        (including a digest that differs on arrival), `SshConnectionLost`."""
        remote_dir = self._ensure_scripts()
        self._uploader.upload(remote_dir, [UploadFile(name, data, mode)])
        return f"{remote_dir}/{name}"

    def close(self) -> None:
        """Remove the uploaded scripts and disconnect. Idempotent; never raises for a dead connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._remote_dir is not None and self._transport.is_active():
                result = self.run(["rm", "-rf", "--", self._remote_dir], timeout=15)
                if not result.ok:
                    logger.warning("could not remove %s on %s: %s", self._remote_dir, self._target.host,
                                   result.stderr.strip()[-200:])
        except (SshConnectionLost, RemoteTimeout) as e:
            # Cleanup is best effort: the directory holds only our scripts (never parameters), and
            # failing the caller's job over it would hide the error that actually matters.
            logger.warning("could not remove %s on %s: %s", self._remote_dir, self._target.host, e)
        finally:
            self._transport.close()

    def _exec(self, argv: Sequence[str]) -> paramiko.Channel:
        """Start `argv` (each part shell-quoted) on a new exec channel."""
        try:
            channel = self._transport.open_session(timeout=self._channel_timeout)
            channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshConnectionLost(f"connection to {self._target.host} failed: {e}") from e
        return channel

    def _ensure_scripts(self) -> str:
        if self._remote_dir is None:
            # mktemp -d creates the directory with mode 700, so no other user on the host can read or
            # swap the scripts before we run them as root.
            made = self.run(["mktemp", "-d", "-t", "gpusnap.XXXXXXXXXX"], timeout=30)
            remote_dir = made.stdout.strip()
            if not made.ok or not remote_dir.startswith("/") or "\n" in remote_dir:
                raise ScriptUploadFailed(f"mktemp -d failed on {self._target.host}: {made.stderr.strip()[-500:]}")
            self._remote_dir = remote_dir  # set before the upload, so close() removes a partial one
        remote_dir = self._remote_dir
        if self._scripts_uploaded:
            return remote_dir
        files = sorted(p for p in self._scripts_dir.glob("*.py") if p.name != "__init__.py")
        self._uploader.upload(remote_dir, [UploadFile.from_path(p) for p in files])
        self._scripts_uploaded = True  # only now: after a failed upload, the next run_script uploads again
        logger.debug("uploaded %d script(s) to %s:%s", len(files), self._target.host, remote_dir)
        return remote_dir

    def _stream(
        self,
        name: str,
        payload: bytes,
        *,
        cancel: threading.Event | None,
        deadline_s: float | None,
        idle_timeout_s: float | None,
    ) -> Iterator[dict[str, Any]]:
        remote_dir = self._ensure_scripts()
        if cancel is not None and cancel.is_set():
            raise RemoteCancelled(f"remote script {name} on {self._target.host} was cancelled before it started")
        channel = self._exec([*self._python_argv, f"{remote_dir}/{name}.py"])
        run = _ScriptRun(reader=ChannelReader(channel, transport=self._transport),
                         output=ScriptOutput(stderr_tail=_STDERR_TAIL_BYTES, log_prefix=f"{self._target.host}:{name}"))
        started = last_output = time.monotonic()
        saw_error = False
        try:
            try:
                channel.sendall(payload)
                channel.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException) as e:
                # The script may have exited before reading stdin; its output still tells why.
                logger.debug("could not write stdin of %s: %s", name, e)
            while not run.reader.finished:
                if cancel is not None and cancel.is_set():
                    self._kill_group(run)
                    raise RemoteCancelled(f"remote script {name} on {self._target.host} was cancelled")
                now = time.monotonic()
                if deadline_s is not None and now - started > deadline_s:
                    self._kill_group(run)
                    raise RemoteTimeout(f"remote script {name} on {self._target.host} ran past {deadline_s:g}s")
                if idle_timeout_s is not None and now - last_output > idle_timeout_s:
                    self._kill_group(run)
                    raise RemoteTimeout(
                        f"remote script {name} on {self._target.host} was silent for {idle_timeout_s:g}s"
                    )
                events = run.pump(0.2)
                if run.got_output:
                    last_output = time.monotonic()
                for event in events:
                    saw_error = saw_error or event.get("event") == "error"
                    yield event
            for event in run.output.flush():
                saw_error = saw_error or event.get("event") == "error"
                yield event
            status = run.reader.exit_status()
            if status != 0 and not saw_error:
                what = f"exit status {status}" if status >= 0 else "no exit status (killed by a signal?)"
                yield {"event": "error", "code": "remote_exit", "message": f"{what}: {run.output.stderr_tail()}"}
        finally:
            if not run.killed and not run.reader.finished and self._transport.is_active():
                # Abandoned early (the caller closed the iterator, or an error above): do not leave a
                # script uploading in the background with nobody watching it.
                self._kill_group(run)
            channel.close()

    def _kill_group(self, run: _ScriptRun) -> None:
        """TERM the script's process group, KILL it after a grace period; best effort, bounded time."""
        run.killed = True
        if run.pgid is None:
            # The `started` event may be in flight; wait briefly for it rather than leave orphans.
            wait_until = time.monotonic() + _KILL_GRACE_S
            while run.pgid is None and not run.reader.finished and time.monotonic() < wait_until:
                run.pump(0.1)
        if run.reader.finished:
            return
        pgid = run.pgid
        if pgid is None:
            logger.warning("cannot kill remote script on %s: it never reported its process group", self._target.host)
            return
        try:
            self.run(["sh", "-c", _KILL_GROUP_SH, "sh", str(pgid), str(int(_KILL_GRACE_S / 0.1))],
                     timeout=_KILL_GRACE_S + 10)
        except (SshConnectionLost, RemoteTimeout) as e:
            logger.warning("could not kill process group %d on %s: %s", pgid, self._target.host, e)
            return
        logger.info("killed remote process group %d on %s", pgid, self._target.host)


class _ScriptRun:
    """State of one running script: its channel reader, output parser and process group."""

    def __init__(self, *, reader: ChannelReader, output: ScriptOutput) -> None:
        self.reader = reader
        self.output = output
        self.pgid: int | None = None
        self.killed = False
        self.got_output = False

    def pump(self, timeout: float) -> list[dict[str, Any]]:
        out, err = self.reader.read(timeout)
        self.got_output = bool(out or err)
        events = self.output.feed(out, err)
        for event in events:
            if event.get("event") == "started" and self.pgid is None:
                self.pgid = _valid_pgid(event.get("pgid"))
        return events


def _valid_pgid(value: object) -> int | None:
    # Never let a bogus event turn into `kill -TERM -1` (every process) or `-0` (our own group).
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return value
    return None
