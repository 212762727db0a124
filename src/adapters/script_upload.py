"""Copy files (our scripts, a shipped tool) into a session's private directory on a GPU host.

SFTP first; an sshd without the `sftp` subsystem (minimal images, some container sshd configs)
refuses the channel, and then every file goes over an exec channel instead: `<remote_python> -c
<gs_receive.py> <dir> receive` reads them from stdin. Either way the host then proves what it holds:
`gs_receive.py` checks the directory is ours and 0700 and recomputes each file's SHA-256 (the exec
path checks while writing; the SFTP path with a separate `check` run). See docs/ssh.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from src.adapters.remote_channel import ChannelReader
from src.adapters.remote_errors import ScriptUploadFailed, SshConnectionLost

logger = logging.getLogger(__name__)

_RECEIVER = Path(__file__).resolve().parent.parent / "remote_scripts" / "gs_receive.py"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_SEND_CHUNK = 1 << 18
_MIN_RATE = 1 << 20  # bytes/s: an upload may take 60 s plus one second per MiB before it times out


@dataclass(frozen=True)
class UploadFile:
    """One file to place in the private directory: its name there, its bytes, its mode (<= 0700)."""

    name: str
    data: bytes
    mode: int = 0o600

    def __post_init__(self) -> None:
        # The same rule gs_receive.py applies on the host: a plain name inside the private directory.
        if not _NAME.match(self.name) or not 0 <= self.mode <= 0o700:
            raise ValueError(f"cannot upload {self.name!r} with mode {self.mode:o}")

    @classmethod
    def from_path(cls, path: Path, mode: int = 0o600) -> UploadFile:
        """Read a local file to upload; raises `ScriptUploadFailed` when it cannot be read."""
        try:
            return cls(path.name, path.read_bytes(), mode)
        except OSError as e:
            raise ScriptUploadFailed(f"cannot read {path} to upload it: {e}") from e

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def entry(self) -> dict[str, object]:
        return {"name": self.name, "size": len(self.data), "sha256": self.sha256, "mode": self.mode}


class ScriptUploader:
    """Uploads for one connection; remembers that a host has no SFTP so it is asked only once."""

    def __init__(
        self, *, transport: paramiko.Transport, host: str, python_argv: Sequence[str], channel_timeout: float = 10.0
    ) -> None:
        self._transport = transport
        self._host = host
        self._python_argv = list(python_argv)
        self._channel_timeout = channel_timeout
        self.sftp_available: bool | None = None  # None: not tried yet; False: absent or cannot write
        self.last_method: str | None = None

    def upload(self, remote_dir: str, files: Sequence[UploadFile]) -> str:
        """Place `files` in `remote_dir` and check them there; returns "sftp" or "exec".

        Idempotent (a file is replaced whole). Raises `ScriptUploadFailed` when the directory is not
        private or a file does not arrive intact, `SshConnectionLost` when the connection dies."""
        if not files:
            return "none"
        method = "exec"
        timeout = 60.0 + sum(len(f.data) for f in files) / _MIN_RATE
        if self.sftp_available is not False:
            sftp = self._open_sftp(timeout)
            if sftp is not None:
                try:
                    self._put_sftp(sftp, remote_dir, files)
                    method = "sftp"
                except ScriptUploadFailed as e:
                    # SFTP is there but cannot reach the directory (a chrooted internal-sftp, say):
                    # the exec channel may still; if not, its own error says why.
                    logger.warning("SFTP upload to %s failed (%s); sending files over an exec channel", self._host, e)
                    self.sftp_available = False  # and from now on: it would only fail again
                finally:
                    sftp.close()
        self._receive(remote_dir, files, "check" if method == "sftp" else "receive")
        self.last_method = method
        logger.debug("uploaded %d file(s) to %s:%s by %s", len(files), self._host, remote_dir, method)
        return method

    def _open_sftp(self, timeout: float) -> paramiko.SFTPClient | None:
        channel: paramiko.Channel | None = None
        try:
            # open_sftp_client() would wait for the channel without a limit; every read and write on
            # this channel is bounded by `timeout` too (paramiko raises socket.timeout).
            channel = self._transport.open_session(timeout=self._channel_timeout)
            channel.settimeout(timeout)
            channel.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(channel)
        except (paramiko.SSHException, EOFError, OSError) as e:
            if channel is not None:
                channel.close()
            if not self._transport.is_active():
                raise SshConnectionLost(f"connection to {self._host} lost while opening SFTP") from e
            # OpenSSH answers a subsystem it does not have by closing the channel ("Channel closed.").
            logger.info("%s offers no SFTP subsystem (%s); sending files over an exec channel", self._host, e)
            self.sftp_available = False
            return None
        self.sftp_available = True
        return sftp

    def _put_sftp(self, sftp: paramiko.SFTPClient, remote_dir: str, files: Sequence[UploadFile]) -> None:
        try:
            for f in files:
                with sftp.open(f"{remote_dir}/{f.name}", "wb") as remote_file:
                    remote_file.set_pipelined(True)
                    remote_file.write(f.data)
                sftp.chmod(f"{remote_dir}/{f.name}", f.mode & 0o700)
        except (OSError, EOFError, paramiko.SSHException) as e:
            if not self._transport.is_active():
                raise SshConnectionLost(f"connection to {self._host} lost while uploading to {remote_dir}") from e
            raise ScriptUploadFailed(f"could not upload to {self._host}:{remote_dir}: {e}") from e

    def _receive(self, remote_dir: str, files: Sequence[UploadFile], mode: str) -> None:
        """Run gs_receive.py on the host: `receive` (write from stdin) or `check` (hash what is there)."""
        header = json.dumps({"files": [f.entry() for f in files]}).encode() + b"\n"
        size = sum(len(f.data) for f in files) if mode == "receive" else 0
        timeout = 60.0 + size / _MIN_RATE
        argv = [*self._python_argv, "-c", _RECEIVER.read_text(), remote_dir, mode]
        try:
            channel = self._transport.open_session(timeout=self._channel_timeout)
            channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SshConnectionLost(f"connection to {self._host} failed: {e}") from e
        try:
            status, out, err = self._talk(
                channel,
                [header] + ([f.data for f in files] if mode == "receive" else []),
                deadline=time.monotonic() + timeout,
            )
        finally:
            channel.close()
        answer = _last_json_line(out)
        if status == 0 and answer.get("ok") is True:
            return
        if status == 127 and not answer:
            raise ScriptUploadFailed(
                f"REMOTE_PYTHON ({shlex.join(self._python_argv)}) was not found on "
                f"{self._host}: set REMOTE_PYTHON to the host's python3 (3.8+)"
            )
        why = answer.get("error") or err.decode("utf-8", "replace").strip()[-500:] or f"exit status {status}"
        raise ScriptUploadFailed(f"files in {self._host}:{remote_dir} failed the {mode} step: {why}")

    def _talk(self, channel: paramiko.Channel, chunks: list[bytes], *, deadline: float) -> tuple[int, bytes, bytes]:
        reader = ChannelReader(channel, transport=self._transport)
        out, err = bytearray(), bytearray()
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    # Bounded waits: a host that stops reading must not hold us past the deadline.
                    channel.settimeout(max(0.1, deadline - time.monotonic()))
                    sent = channel.send(view[:_SEND_CHUNK])
                    if sent <= 0:
                        raise EOFError("the receiver closed its stdin")
                    view = view[sent:]
                    if time.monotonic() > deadline:
                        raise TimeoutError("upload ran past its deadline")
            channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as e:
            if not self._transport.is_active():
                raise SshConnectionLost(f"connection to {self._host} lost while sending files") from e
            # The receiver may have stopped early (refused the directory); its answer says why.
            logger.debug("sending files to %s stopped: %s", self._host, e)
        while not reader.finished:
            if time.monotonic() > deadline:
                raise ScriptUploadFailed(f"sending files to {self._host} ran past its deadline")
            got_out, got_err = reader.read(min(0.2, max(0.0, deadline - time.monotonic())))
            out += got_out
            err += got_err
        return reader.exit_status(), bytes(out), bytes(err)


def _last_json_line(out: bytes) -> dict[str, object]:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}
