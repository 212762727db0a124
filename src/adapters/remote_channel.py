"""Reading an exec channel without ever blocking past a deadline, and splitting script output.

paramiko's `recv_exit_status()` and blocking `recv()` ignore channel timeouts when the host goes
quiet, so we poll: wait on the channel's pipe for at most a short interval, then take whatever both
streams hold. Stdout and stderr must both be drained, or a chatty stderr fills the window and the
remote process blocks forever.
"""

from __future__ import annotations

import json
import logging
import select
import time
from typing import Any

import paramiko

from src.adapters.remote_errors import SshConnectionLost

logger = logging.getLogger(__name__)

_CHUNK = 65536
_MAX_LINE = 1 << 20  # a "line" longer than this is not one of our events; drop it instead of growing


class ChannelReader:
    """Non-blocking view of one exec channel: both output streams and the exit status."""

    # A server that never sends EOF after the exit status is waited for this long, then believed.
    EOF_GRACE_S = 5.0

    def __init__(self, channel: paramiko.Channel, *, transport: paramiko.Transport) -> None:
        self._channel = channel
        self._transport = transport
        self._exited_at: float | None = None

    @property
    def finished(self) -> bool:
        """True once the process exited and all of its output was read (or the connection closed).

        The exit status alone is not the end: OpenSSH's sshd sends `exit-status` as soon as the
        process is reaped, possibly before the last bytes of its stdout (a script's final `result`
        line) have been relayed. The end of the output is the channel's EOF (or close)."""
        channel = self._channel
        if channel.recv_ready() or channel.recv_stderr_ready():
            return False
        if not self._transport.is_active() or channel.closed:
            return True
        if not channel.exit_status_ready():
            return False
        if channel.eof_received:
            return True
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        return time.monotonic() - self._exited_at > self.EOF_GRACE_S

    @property
    def exited(self) -> bool:
        """True once the host reported the process's end: its exit status, or (a death by a signal,
        which paramiko does not record) the server closing the channel on a live connection. Unlike
        `finished`, a dead connection is never taken for an ended process."""
        channel = self._channel
        if channel.exit_status_ready() and channel.exit_status != -1:
            return True
        return channel.closed and self._transport.is_active()

    def read(self, timeout: float) -> tuple[bytes, bytes]:
        """Wait up to `timeout` seconds for output; return what stdout and stderr hold (maybe b"").
        The channel's pipe is set on new data, EOF and close, so the wait ends at the first of them."""
        channel = self._channel
        if not (channel.recv_ready() or channel.recv_stderr_ready() or channel.eof_received):
            select.select([channel], [], [], timeout)
        out = bytearray()
        err = bytearray()
        while channel.recv_ready():
            out += channel.recv(_CHUNK)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(_CHUNK)
        return bytes(out), bytes(err)

    def exit_status(self) -> int:
        """The exit status once `finished`: -1 when the process ended without one (killed by a signal).
        Raises `SshConnectionLost` when the connection died before the process reported its end."""
        if self._channel.exit_status_ready() and self._channel.exit_status != -1:
            return self._channel.exit_status
        if not self._transport.is_active():
            raise SshConnectionLost("the SSH connection dropped before the remote process finished")
        return self._channel.exit_status


class ScriptOutput:
    """Turns a script's stdout into event dicts and keeps the tail of its stderr for error messages.

    Stdout lines that are not JSON objects and every stderr line are logged at debug level; they are
    the script's own diagnostics (our parameters travel on stdin and are never echoed here)."""

    def __init__(self, *, stderr_tail: int = 4096, log_prefix: str = "") -> None:
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._tail = bytearray()
        self._tail_limit = stderr_tail
        self._prefix = log_prefix

    def feed(self, out: bytes, err: bytes) -> list[dict[str, Any]]:
        """Add output; return the events completed by it, in order."""
        if err:
            self._stderr += err
            self._tail = (self._tail + err)[-self._tail_limit :]
            self._log_stderr_lines()
        if not out:
            return []
        self._stdout += out
        events = []
        while (end := self._stdout.find(b"\n")) >= 0:
            line = bytes(self._stdout[:end])
            del self._stdout[: end + 1]
            event = self._parse(line)
            if event is not None:
                events.append(event)
        if len(self._stdout) > _MAX_LINE:
            logger.debug("%s: dropping %d bytes of stdout without a newline", self._prefix, len(self._stdout))
            self._stdout.clear()
        return events

    def flush(self) -> list[dict[str, Any]]:
        """The process ended: treat unterminated output as a last line."""
        line = bytes(self._stdout)
        self._stdout.clear()
        if self._stderr:
            logger.debug("%s stderr: %s", self._prefix, self._stderr.decode("utf-8", "replace"))
            self._stderr.clear()
        event = self._parse(line)
        return [event] if event is not None else []

    def stderr_tail(self) -> str:
        """The last few KB of stderr, decoded, for error messages."""
        return self._tail.decode("utf-8", "replace").strip()

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("event"), str):
            return value
        logger.debug("%s stdout: %s", self._prefix, text[:1000])
        return None

    def _log_stderr_lines(self) -> None:
        buffer = self._stderr
        while (end := buffer.find(b"\n")) >= 0:
            logger.debug("%s stderr: %s", self._prefix, buffer[:end].decode("utf-8", "replace")[:1000])
            del buffer[: end + 1]
        if len(buffer) > _MAX_LINE:
            buffer.clear()
