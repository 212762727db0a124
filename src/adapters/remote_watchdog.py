"""Bounding paramiko calls that have no timeout of their own.

paramiko waits without a limit in several places a silent host can hold forever: `Channel.exec_command`
and `invoke_subsystem` (the SFTP start) wait for the server's reply to the channel request, and SFTP
reads block on the channel. The one thing that reliably ends every such wait is closing the
transport: paramiko then wakes every waiting channel with an error. So each blocking call runs under
`Watchdog.guard(what, timeout, cancel)`: a thread watching the clock and the cancel event closes the
transport when the call overruns or the caller cancels, and the guard turns the resulting paramiko
error into `RemoteTimeout` or `RemoteCancelled`. One watchdog per connection; guards do not nest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import paramiko

from src.adapters.remote_errors import RemoteCancelled, RemoteError, RemoteTimeout

logger = logging.getLogger(__name__)

_POLL_S = 0.05
# What a call interrupted by closing the transport raises (paramiko, the socket, or our own wrapping).
_INTERRUPTED = (paramiko.SSHException, OSError, EOFError, RemoteError)


class Watchdog:
    """Closes `transport` when a guarded call passes its deadline or its cancel event is set.

    `fired` is None until then, afterwards "timeout" or "cancel": the connection is gone for good."""

    def __init__(self, transport: paramiko.Transport, *, where: str) -> None:
        self._transport = transport
        self._where = where
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._cancel: threading.Event | None = None
        self._what = ""
        self._timeout = 0.0
        self._stop = threading.Event()
        self.fired: str | None = None
        self.fired_during = ""
        self._thread = threading.Thread(target=self._watch, name=f"ssh-watchdog-{where}", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, what: str, *, timeout: float, cancel: threading.Event | None = None) -> Iterator[None]:
        """Run the body with `timeout` seconds and `cancel` watched. Raises `RemoteTimeout` or
        `RemoteCancelled` (chained to what paramiko raised) when the watchdog had to close the
        connection; other errors pass through unchanged."""
        with self._lock:
            self._deadline, self._cancel, self._what, self._timeout = time.monotonic() + timeout, cancel, what, timeout
        try:
            yield
        except _INTERRUPTED as e:
            if isinstance(e, (RemoteTimeout, RemoteCancelled)) or self.fired is None:
                raise
            raise self.error() from e
        finally:
            with self._lock:
                self._deadline, self._cancel = None, None

    def error(self) -> RemoteError:
        """The error a call cut short by this watchdog reports."""
        if self.fired == "cancel":
            return RemoteCancelled(f"cancelled during {self.fired_during} on {self._where}; connection closed")
        return RemoteTimeout(f"{self.fired_during} on {self._where} got no answer in time; connection closed")

    def stop(self) -> None:
        """End the watching thread (the connection is being closed). Idempotent."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            with self._lock:
                deadline, cancel, what, timeout = self._deadline, self._cancel, self._what, self._timeout
            if deadline is None:
                continue
            reason = None
            if cancel is not None and cancel.is_set():
                reason = "cancel"
            elif time.monotonic() > deadline:
                reason = "timeout"
            if reason is None:
                continue
            self.fired, self.fired_during = reason, f"{what} ({timeout:g}s limit)" if reason == "timeout" else what
            logger.warning(
                "closing the SSH connection to %s: %s during %s",
                self._where,
                "cancel" if reason == "cancel" else f"no answer within {timeout:g}s",
                what,
            )
            self._transport.close()
            return
