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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import paramiko

from src.adapters.remote_channel import ChannelReader, ScriptOutput
from src.adapters.remote_errors import (
    RemoteCancelled,
    RemoteError,
    RemoteStateUnknown,
    RemoteTimeout,
    ScriptUploadFailed,
    SshConnectionLost,
)
from src.adapters.remote_kill import kill_script
from src.adapters.remote_types import CommandResult, SshTarget
from src.adapters.remote_watchdog import Watchdog
from src.adapters.script_upload import ScriptUploader, UploadFile

logger = logging.getLogger(__name__)

_SCRIPT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KILL_GRACE_S = 5.0
# How long a host may take to answer an exec request (it forks first): generous, since a slow answer
# ends the job; a host that never answers is what this bounds.
_EXEC_ANSWER_S = 30.0
_STDERR_TAIL_BYTES = 4096


class RemoteSession:
    """One authenticated connection (from `SshClient.open`). Not thread-safe: use it from one thread;
    other threads may only set a `cancel` event (the session's own, or the one handed to a call).
    Every blocking step runs under the connection's `Watchdog`, so none outlives its limit or a
    cancel. Close it (or use `with`)."""

    def __init__(
        self,
        *,
        transport: paramiko.Transport,
        target: SshTarget,
        host_key: str,
        remote_python: str,
        scripts_dir: Path,
        channel_timeout: float = 10.0,
        watchdog: Watchdog | None = None,
        cancel: threading.Event | None = None,
        reconnect: Callable[[], RemoteSession] | None = None,
        upload_timeout: float = 120.0,
    ) -> None:
        self._transport = transport
        self._target = target
        self._host_key = host_key
        self._python_argv = shlex.split(remote_python)
        self._scripts_dir = scripts_dir
        self._channel_timeout = channel_timeout
        self._watchdog = watchdog or Watchdog(transport, where=f"{target.host}:{target.port}")
        self._cancel = cancel
        self._reconnect = reconnect
        self._upload_timeout = upload_timeout
        self._remote_dir: str | None = None
        self._scripts_uploaded = False
        self._closed = False
        # SFTP, or an exec channel where the host has no SFTP subsystem; what arrives is hash-checked.
        self._uploader = ScriptUploader(
            transport=transport, host=target.host, python_argv=self._python_argv, channel_timeout=channel_timeout
        )

    def _interpreter_hint(self, status: int, stderr_tail: str) -> str:
        """When the interpreter itself could not run the script (not found: the shell's 126/127; too old
        to parse it), say which setting names it."""
        if status in (126, 127) or "SyntaxError" in stderr_tail:
            return (
                f" (the host could not run REMOTE_PYTHON={shlex.join(self._python_argv)!r}: set REMOTE_PYTHON "
                "to a Python 3.8+ interpreter that exists on the GPU host)"
            )
        return ""

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

    def run(self, command: Sequence[str], *, timeout: float, cancel: threading.Event | None = None) -> CommandResult:
        """Run a small command (argv, each part shell-quoted; no PTY, empty stdin) and wait for it.

        Returns its exit status and output whatever the status. Not idempotent by itself: it runs the
        command. Raises `RemoteTimeout` past `timeout` seconds, including a host that never answers
        the exec request (the channel, or then the connection, is closed; a command that ignores
        SIGPIPE may outlive it), `RemoteCancelled` once `cancel` is set (the connection is closed),
        `SshConnectionLost` when the connection dies.
        """
        if not command:
            raise ValueError("empty command")
        # A second longer than the read loop's own limit: the loop reports a slow command; the
        # watchdog only steps in when paramiko itself is stuck (no answer to the exec request).
        with self._watchdog.guard(f"command {command[0]!r}", timeout=timeout + 1.0, cancel=cancel):
            channel = self._open_channel()
            try:
                self._start(channel, command)
                reader = ChannelReader(channel, transport=self._transport)
                stdout, stderr = bytearray(), bytearray()
                deadline = time.monotonic() + timeout
                while not reader.finished:
                    if cancel is not None and cancel.is_set():
                        raise RemoteCancelled(f"command {command[0]!r} on {self._target.host} was cancelled")
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
        iterating) `RemoteCancelled` once `cancel` (default: the session's) is set, `RemoteTimeout`
        past `deadline_s` or after `idle_timeout_s` without any output, `SshConnectionLost`,
        `ScriptUploadFailed`. Whenever the script is stopped early (those errors, or closing the
        iterator), its process group is killed and confirmed gone before the error is raised: on
        this connection, or when it is hung or dead on a fresh one; when neither can confirm it,
        `RemoteStateUnknown` (chained to the first error) is raised instead.
        `ValueError` (at call time) for an unknown script name or params that are not JSON.
        """
        if not _SCRIPT_NAME.match(name) or name == "__init__" or not (self._scripts_dir / f"{name}.py").is_file():
            raise ValueError(f"no remote script named {name!r} in {self._scripts_dir}")
        payload = json.dumps(params).encode() + b"\n"
        return self._stream(
            name, payload, cancel=cancel or self._cancel, deadline_s=deadline_s, idle_timeout_s=idle_timeout_s
        )

    def put_file(self, name: str, data: bytes, *, mode: int = 0o600) -> str:
        """Place `data` as `name` in the private directory (created and filled with the scripts first if
        need be), checked by SHA-256 on the host; returns its path there. Raises `ScriptUploadFailed`
        (including a digest that differs on arrival), `SshConnectionLost`."""
        remote_dir = self._ensure_scripts(self._cancel)
        with self._watchdog.guard(f"uploading {name}", timeout=self._upload_timeout, cancel=self._cancel):
            self._uploader.upload(remote_dir, [UploadFile(name, data, mode)])
        return f"{remote_dir}/{name}"

    def close(self) -> None:
        """Remove the uploaded scripts and disconnect. Idempotent; never raises for a dead connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._remote_dir is not None and self._transport.is_active() and self._watchdog.fired is None:
                result = self.run(["rm", "-rf", "--", self._remote_dir], timeout=15)
                if not result.ok:
                    logger.warning(
                        "could not remove %s on %s: %s",
                        self._remote_dir,
                        self._target.host,
                        result.stderr.strip()[-200:],
                    )
        except RemoteError as e:
            # Cleanup is best effort: the directory holds only our scripts (never parameters), and
            # failing the caller's job over it would hide the error that actually matters.
            logger.warning("could not remove %s on %s: %s", self._remote_dir, self._target.host, e)
        finally:
            self._watchdog.stop()
            self._transport.close()

    def _open_channel(self) -> paramiko.Channel:
        try:
            return self._transport.open_session(timeout=self._channel_timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshConnectionLost(f"connection to {self._target.host} failed: {e}") from e

    def _start(self, channel: paramiko.Channel, argv: Sequence[str]) -> None:
        """Send the exec request for `argv` (each part shell-quoted). paramiko waits for the answer
        without a limit: callers hold a watchdog guard."""
        try:
            channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshConnectionLost(f"connection to {self._target.host} failed: {e}") from e

    def _ensure_scripts(self, cancel: threading.Event | None) -> str:
        if self._remote_dir is None:
            # mktemp -d creates the directory with mode 700, so no other user on the host can read or
            # swap the scripts before we run them as root.
            made = self.run(["mktemp", "-d", "-t", "gpusnap.XXXXXXXXXX"], timeout=30, cancel=cancel)
            remote_dir = made.stdout.strip()
            if not made.ok or not remote_dir.startswith("/") or "\n" in remote_dir:
                raise ScriptUploadFailed(f"mktemp -d failed on {self._target.host}: {made.stderr.strip()[-500:]}")
            self._remote_dir = remote_dir  # set before the upload, so close() removes a partial one
        remote_dir = self._remote_dir
        if self._scripts_uploaded:
            return remote_dir
        files = sorted(p for p in self._scripts_dir.glob("*.py") if p.name != "__init__.py")
        # SFTP start and reads wait without a limit in paramiko, and so may the exec-channel fallback:
        # the guard bounds the whole upload (and a cancel closes the connection at once).
        with self._watchdog.guard("script upload", timeout=self._upload_timeout, cancel=cancel):
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
        if cancel is not None and cancel.is_set():
            raise RemoteCancelled(f"remote script {name} on {self._target.host} was cancelled before it started")
        remote_dir = self._ensure_scripts(cancel)
        with self._watchdog.guard(f"starting {name}", timeout=self._channel_timeout, cancel=cancel):
            channel = self._open_channel()
        run = _ScriptRun(
            name=name,
            remote_dir=remote_dir,
            reader=ChannelReader(channel, transport=self._transport),
            output=ScriptOutput(stderr_tail=_STDERR_TAIL_BYTES, log_prefix=f"{self._target.host}:{name}"),
        )
        started = last_output = time.monotonic()
        saw_error = False
        try:
            try:
                with self._watchdog.guard(
                    f"starting {name}", timeout=max(self._channel_timeout, _EXEC_ANSWER_S), cancel=cancel
                ):
                    run.launched = True  # from here the script may run, whatever the answer says
                    self._start(channel, [*self._python_argv, f"{remote_dir}/{name}.py"])
                try:
                    channel.sendall(payload)
                    channel.shutdown_write()
                except (OSError, EOFError, paramiko.SSHException) as e:
                    # The script may have exited before reading stdin; its output still tells why.
                    logger.debug("could not write stdin of %s: %s", name, e)
                while not run.reader.finished:
                    if cancel is not None and cancel.is_set():
                        raise RemoteCancelled(f"remote script {name} on {self._target.host} was cancelled")
                    now = time.monotonic()
                    if deadline_s is not None and now - started > deadline_s:
                        raise RemoteTimeout(f"remote script {name} on {self._target.host} ran past {deadline_s:g}s")
                    if idle_timeout_s is not None and now - last_output > idle_timeout_s:
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
            except RemoteError as e:
                self._stop_script(run, e)
                raise
            except BaseException:
                # Abandoned early (the caller closed the iterator, or an error of ours): do not leave
                # a script uploading in the background with nobody watching it.
                self._stop_script(run, RemoteCancelled(f"remote script {name} was abandoned by its caller"))
                raise
            if status != 0 and not saw_error:
                what = f"exit status {status}" if status >= 0 else "no exit status (killed by a signal?)"
                tail = run.output.stderr_tail()
                yield {
                    "event": "error",
                    "code": "remote_exit",
                    "message": f"{what}: {tail}{self._interpreter_hint(status, tail)}",
                }
        finally:
            channel.close()

    def _stop_script(self, run: _ScriptRun, cause: RemoteError) -> None:
        """Make sure the script's process group is gone. Returns when it is confirmed (or the script
        never started, or already exited); raises `RemoteStateUnknown` from `cause` when not."""
        if not run.launched or run.reader.exited:
            return
        where = f"{self._target.host}:{self._target.port}"
        if self._transport.is_active() and self._watchdog.fired is None:
            try:
                if self._kill(self, run):
                    return
            except RemoteError as e:
                logger.warning("could not stop %s on %s over its own connection: %s", run.name, where, e)
        # This connection is hung or gone: the script may live on (a black-holed link never gives it
        # SIGPIPE). Drop the connection and try again on a fresh one.
        self._watchdog.stop()
        self._transport.close()
        if self._reconnect is not None:
            try:
                with self._reconnect() as fresh:
                    if self._kill(fresh, run):
                        fresh.run(["rm", "-rf", "--", run.remote_dir], timeout=15)
                        self._remote_dir = None  # removed: close() has nothing left to do
                        return
            except RemoteError as e:
                logger.warning("could not stop %s on %s over a fresh connection: %s", run.name, where, e)
        group = f"process group {run.pgid}" if run.pgid else "its process group (never reported)"
        raise RemoteStateUnknown(
            f"remote script {run.name} on {where} was stopped ({cause.code}: {cause.message}) but {group} "
            "could not be confirmed dead; it may still be running and changing the host",
            cause=cause,
            pgid=run.pgid,
            script=run.name,
        ) from cause

    def _kill(self, session: RemoteSession, run: _ScriptRun) -> bool:
        """TERM then KILL the script's process group through `session`; True once confirmed gone."""
        return kill_script(
            session,
            remote_dir=run.remote_dir,
            name=run.name,
            pgid=run.pgid,
            grace_s=_KILL_GRACE_S,
            where=self._target.host,
        )


class _ScriptRun:
    """State of one running script: its channel reader, output parser and process group."""

    def __init__(self, *, name: str, remote_dir: str, reader: ChannelReader, output: ScriptOutput) -> None:
        self.name = name
        self.remote_dir = remote_dir
        self.reader = reader
        self.output = output
        self.pgid: int | None = None
        self.launched = False  # the exec request was sent: from then on the script may be running
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
