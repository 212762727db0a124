"""A real SSH server (paramiko, server mode) that lets our key in and then never answers: the hostile
or wedged GPU host of issue 9. It completes the key exchange and public-key authentication, accepts
session channels, and then holds every `exec` request (mode "exec") or every SFTP subsystem request
(mode "sftp", while answering exec requests like a tiny shell: `mktemp` prints a directory, anything
else exits 0) without ever replying. The transport thread that handles the request is blocked, so the
connection goes fully silent, keepalives included, exactly like a host whose sshd hangs.

    with SilentSshServer(authorized_key_path=client_key, mode="exec") as server:
        ... connect to server.host:server.port ...
    server.connections  # how many TCP connections were accepted
    server.held         # how many requests are being held unanswered right now
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import paramiko

logger = logging.getLogger(__name__)

_HOST_KEY = None  # generating an RSA key takes a moment: one per test session is enough
_HOST_KEY_LOCK = threading.Lock()


def _host_key() -> paramiko.RSAKey:
    global _HOST_KEY
    with _HOST_KEY_LOCK:
        if _HOST_KEY is None:
            _HOST_KEY = paramiko.RSAKey.generate(2048)
        return _HOST_KEY


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: SilentSshServer) -> None:
        self._server = server

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.asbytes() == self._server.authorized_key.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self._server.exec_requests.append(command.decode("utf-8", "replace"))
        if self._server.mode == "exec":
            self._server.hold()
            return False
        threading.Thread(target=_answer_exec, args=(channel, command), daemon=True).start()
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        self._server.subsystem_requests.append(name)
        self._server.hold()
        return False


def _answer_exec(channel: paramiko.Channel, command: bytes) -> None:
    """A stand-in for a shell: enough for the adapter to get past `mktemp -d` to its SFTP upload."""
    time.sleep(0.05)  # after the exec request's success reply has gone out
    try:
        if command.startswith(b"mktemp"):
            channel.sendall(b"/tmp/gpusnap.silent0000\n")
        channel.send_exit_status(0)
        channel.shutdown_write()
        channel.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass


class SilentSshServer:
    """Listens on 127.0.0.1 (a free port); `mode` is "exec" or "sftp" (what it never answers)."""

    def __init__(self, *, authorized_key_path: str | Path, mode: str = "exec") -> None:
        if mode not in ("exec", "sftp"):
            raise ValueError(f"mode must be 'exec' or 'sftp', not {mode!r}")
        self.mode = mode
        self.authorized_key = paramiko.PKey.from_path(str(authorized_key_path))
        self.host = "127.0.0.1"
        self.connections = 0
        self.held = 0
        self.exec_requests: list[str] = []
        self.subsystem_requests: list[str] = []
        self._release = threading.Event()
        self._transports: list[paramiko.Transport] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="silent-sshd", daemon=True)
        self._thread.start()

    @property
    def host_public_key(self) -> str:
        key = _host_key()
        return f"{key.get_name()} {key.get_base64()}"

    def hold(self) -> None:
        """Block the calling transport thread until the server stops (never answer this request)."""
        self.held += 1
        try:
            self._release.wait()
        finally:
            self.held -= 1

    def _accept(self) -> None:
        while not self._release.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            transport = paramiko.Transport(conn)
            transport.add_server_key(_host_key())
            self._transports.append(transport)
            try:
                transport.start_server(server=_Interface(self))
            except (paramiko.SSHException, OSError, EOFError) as e:
                logger.debug("silent sshd: handshake failed: %s", e)

    def stop(self) -> None:
        self._release.set()
        self._sock.close()
        for transport in self._transports:
            transport.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SilentSshServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
