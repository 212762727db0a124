"""Errors of the SSH adapter. Every paramiko or socket exception leaves the adapter as one of these,
chained with `raise ... from e`, so job handlers see stable codes and never import paramiko."""

from __future__ import annotations

from src.adapters.remote_types import host_key_fingerprint
from src.errors import ExternalError


class RemoteError(ExternalError):
    """Talking to a GPU host over SSH failed. `retryable` says whether trying again may help."""

    code = "remote_error"


class HostKeyMismatch(RemoteError):
    """The host presented a different host key than the one pinned on first use. Nothing was sent:
    no authentication, no command, no secret. Never retryable; an operator (or a wake onto a new
    instance) clears the pin."""

    code = "host_key_mismatch"

    def __init__(self, *, host: str, port: int, expected: str, presented: str) -> None:
        super().__init__(
            f"host key of {host}:{port} changed: pinned {host_key_fingerprint(expected)}, "
            f"presented {host_key_fingerprint(presented)}"
        )
        self.expected = expected
        self.presented = presented


class SshAuthFailed(RemoteError):
    """The host refused our key (or the key at `SSH_KEY_PATH` could not be read)."""

    code = "ssh_auth_failed"


class SshUnreachable(RemoteError):
    """No SSH handshake could be completed within the retries (refused, timed out, no banner)."""

    code = "ssh_unreachable"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message, retryable=retryable)


class SshConnectionLost(RemoteError):
    """An established connection died mid-operation. The remote process may still be running."""

    code = "ssh_connection_lost"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class RemoteTimeout(RemoteError):
    """A command or script ran past its deadline or stayed silent too long; it was killed."""

    code = "remote_timeout"


class RemoteCancelled(RemoteError):
    """The caller cancelled a running script; its process group was killed."""

    code = "cancelled"


class ScriptUploadFailed(RemoteError):
    """The remote scripts could not be copied to the host (no SFTP, disk full, ...)."""

    code = "script_upload_failed"


class RemoteStateUnknown(RemoteError):
    """A remote script was stopped early (cancel, timeout, lost connection) and neither the connection
    it ran on nor a fresh one could confirm that its process group is gone: it may still be running
    and may still change the host (a restore may yet swap the workspace in). `.cause` holds the error
    that stopped it, `.pgid` the process group (None when the script never reported it)."""

    code = "remote_state_unknown"

    def __init__(self, message: str, *, cause: RemoteError, pgid: int | None, script: str) -> None:
        super().__init__(message, retryable=False)
        self.cause = cause
        self.pgid = pgid
        self.script = script
