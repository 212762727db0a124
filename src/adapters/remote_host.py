"""The SSH adapter: reach a GPU host, check who it is, run our remote scripts there.

`SshClient.open(target)` checks the allow-list, connects (retrying while the host's sshd is not up
yet), compares the host key with the pin *before* authenticating, authenticates with our key, and
returns a `RemoteSession` (see `remote_session.py`). This module is the import point for the whole
adapter: targets, results and errors are re-exported here. Design notes: `docs/ssh.md`.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import shlex
import socket
import threading
import time
from pathlib import Path

import paramiko

from src.adapters.remote_errors import (
    HostKeyMismatch,
    RemoteCancelled,
    RemoteError,
    RemoteStateUnknown,
    RemoteTimeout,
    ScriptUploadFailed,
    SshAuthFailed,
    SshConnectionLost,
    SshUnreachable,
)
from src.adapters.remote_session import RemoteSession
from src.adapters.remote_types import CommandResult, SshTarget, host_key_fingerprint, normalize_host_key
from src.adapters.remote_watchdog import Watchdog
from src.adapters.ssh_policy import SshPolicy, TargetNotAllowed

__all__ = [
    "CommandResult",
    "HostKeyMismatch",
    "RemoteCancelled",
    "RemoteError",
    "RemoteSession",
    "RemoteStateUnknown",
    "RemoteTimeout",
    "ScriptUploadFailed",
    "SshAuthFailed",
    "SshClient",
    "SshConnectionLost",
    "SshPolicy",
    "SshTarget",
    "SshUnreachable",
    "TargetNotAllowed",
    "DEFAULT_SCRIPTS_DIR",
]

logger = logging.getLogger(__name__)

DEFAULT_SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "remote_scripts"

# Host key algorithms to put first when a pin of that type exists, so the server presents the pinned
# kind (an sshd with ed25519, ECDSA and RSA keys would otherwise show whichever paramiko prefers).
_PIN_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}


class _NotReadyYet(Exception):
    """Internal: the handshake failed in a way a booting host produces (refused, timeout, no banner)."""


def _key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _same_key(key: paramiko.PKey, pinned: str) -> bool:
    return key.asbytes() == base64.b64decode(pinned.split()[1])


class SshClient:
    """Opens sessions to GPU hosts with one private key. Cheap to build: nothing is read or connected
    until `open`. Thread-safe (holds no connection); each `RemoteSession` belongs to one thread."""

    def __init__(
        self,
        key_path: str | os.PathLike[str],
        *,
        policy: SshPolicy,
        connect_timeout: float = 10.0,
        banner_timeout: float = 15.0,
        auth_timeout: float = 15.0,
        keepalive_s: float = 15.0,
        ready_retries: int | None = None,
        ready_deadline: float = 60.0,
        remote_python: str = "python3",
        scripts_dir: str | os.PathLike[str] = DEFAULT_SCRIPTS_DIR,
        upload_timeout: float = 120.0,
        cleanup_timeout: float = 30.0,
    ) -> None:
        if not shlex.split(remote_python):
            raise ValueError("REMOTE_PYTHON is empty: set it to the GPU host's python3")
        self._key_path = Path(key_path).expanduser()
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._banner_timeout = banner_timeout
        self._auth_timeout = auth_timeout
        self._keepalive_s = keepalive_s
        self._ready_retries = ready_retries
        self._ready_deadline = ready_deadline
        self._remote_python = remote_python
        self._scripts_dir = Path(scripts_dir)
        self._upload_timeout = upload_timeout
        self._cleanup_timeout = cleanup_timeout

    def open(self, target: SshTarget, *, cancel: threading.Event | None = None) -> RemoteSession:
        """Connect, verify the host key, authenticate; return a session (use it as a context manager).

        Order matters and is the contract: allow-list (before any packet); TCP + SSH handshake,
        retried with backoff (0.5 s doubling to 5 s) on refused, timed-out or banner-less connections
        until `ready_deadline` seconds have passed or, when set, `ready_retries` retries were made;
        host key check against `target.pinned_host_key` (None: trust on first use, read
        `session.host_key`); then public-key authentication. Not idempotent only in that it connects.
        Raises `TargetNotAllowed`, `SshUnreachable` (retryable), `HostKeyMismatch` (nothing was
        authenticated or run), `SshAuthFailed`, `RemoteCancelled` (once `cancel` is set: the
        connection attempt is dropped at once), `RemoteTimeout` (the server went silent mid-handshake).
        `cancel` becomes the session's: every later step stops when it is set.
        """
        self._policy.check(target.host)
        pkey = self._load_key()
        transport, watchdog = self._connect_with_retries(target, cancel)
        try:
            # paramiko bounds the authentication answer (auth_timeout); the guard adds the cancel and
            # covers the service request before it, which paramiko waits for without a limit.
            with watchdog.guard("authentication", timeout=self._auth_timeout + self._connect_timeout, cancel=cancel):
                host_key = self._verify_host_key(transport, target)
                self._authenticate(transport, target, pkey)
            transport.set_keepalive(max(1, int(self._keepalive_s)))
        except BaseException:
            watchdog.stop()
            transport.close()
            raise
        logger.info(
            "ssh session open to %s@%s:%d (%s)", target.user, target.host, target.port, host_key_fingerprint(host_key)
        )
        return RemoteSession(
            transport=transport,
            target=target,
            host_key=host_key,
            remote_python=self._remote_python,
            scripts_dir=self._scripts_dir,
            channel_timeout=self._connect_timeout,
            watchdog=watchdog,
            cancel=cancel,
            reconnect=lambda: self._for_cleanup().open(
                SshTarget(host=target.host, port=target.port, user=target.user, pinned_host_key=host_key)
            ),
            upload_timeout=self._upload_timeout,
        )

    def _for_cleanup(self) -> SshClient:
        """A copy of this client for a cleanup connection: the same key, policy and scripts, every
        wait cut to fit `cleanup_timeout`, so stopping a runaway script never hangs a worker."""
        budget = self._cleanup_timeout
        clone = copy.copy(self)
        clone._connect_timeout = min(self._connect_timeout, budget / 3)
        clone._banner_timeout = min(self._banner_timeout, budget / 3)
        clone._auth_timeout = min(self._auth_timeout, budget / 3)
        clone._ready_deadline = budget
        clone._ready_retries = None
        return clone

    def _load_key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(str(self._key_path))
        except (OSError, paramiko.SSHException, ValueError) as e:
            # Deliberately not retryable: a missing or encrypted key will not fix itself.
            raise SshAuthFailed(
                f"cannot load the SSH private key at {self._key_path}: {e} (set SSH_KEY_PATH to "
                "an unencrypted private key whose public half the GPU hosts accept)"
            ) from e

    def _connect_with_retries(
        self, target: SshTarget, cancel: threading.Event | None
    ) -> tuple[paramiko.Transport, Watchdog]:
        deadline = time.monotonic() + self._ready_deadline
        where = f"{target.host}:{target.port}"
        attempt = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise RemoteCancelled(f"cancelled while connecting to {where}")
            try:
                return self._handshake(target, cancel)
            except _NotReadyYet as e:
                attempt += 1
                delay = min(0.5 * 2 ** (attempt - 1), 5.0)
                cause = e.__cause__ or e
                out_of_tries = self._ready_retries is not None and attempt > self._ready_retries
                if out_of_tries or time.monotonic() + delay > deadline:
                    # One message whatever the cause (refused, timed out, no route, no such name, not
                    # SSH): a job error must not tell a caller which ports are open where. The cause
                    # stays in the worker log.
                    logger.warning("giving up on sshd at %s after %d attempt(s): %s", where, attempt, cause)
                    raise SshUnreachable(_unreachable(target)) from cause
                logger.info("sshd at %s not ready (%s); retry %d in %.1fs", where, cause, attempt, delay)
                if cancel is not None:
                    cancel.wait(delay)
                else:
                    time.sleep(delay)

    def _handshake(self, target: SshTarget, cancel: threading.Event | None) -> tuple[paramiko.Transport, Watchdog]:
        """TCP connect to an allowed address, exchange banners and keys. No authentication."""
        sock = self._connect_socket(target)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = self._banner_timeout
        transport.auth_timeout = self._auth_timeout
        if target.pinned_host_key:
            pin_type = target.pinned_host_key.split()[0]
            preferred = _PIN_ALGORITHMS.get(pin_type, (pin_type,))
            options = transport.get_security_options()
            options.key_types = [k for k in preferred if k in options.key_types] + [
                k for k in options.key_types if k not in preferred
            ]
        watchdog = Watchdog(transport, where=f"{target.host}:{target.port}")
        limit = self._connect_timeout + self._banner_timeout
        try:
            with watchdog.guard("SSH handshake", timeout=limit + 1.0, cancel=cancel):
                try:
                    transport.start_client(timeout=limit)
                except (OSError, EOFError) as e:
                    raise _NotReadyYet() from e
                except paramiko.SSHException as e:
                    if not transport.remote_version:
                        raise _NotReadyYet() from e  # no banner yet: sshd starting, or MaxStartups dropped us
                    logger.warning("SSH handshake with %s:%d failed: %s", target.host, target.port, e)
                    raise SshUnreachable(_unreachable(target), retryable=False) from e
        except BaseException:
            watchdog.stop()
            transport.close()
            raise
        return transport, watchdog

    def _connect_socket(self, target: SshTarget) -> socket.socket:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise _NotReadyYet() from e
        # Check every address before trying any, so a forbidden one is never even attempted.
        for info in infos:
            self._policy.check_address(host=target.host, address=str(info[4][0]))
        last_error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self._connect_timeout)
            try:
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                last_error = e
                continue
            self._tune_socket(sock)
            return sock
        raise _NotReadyYet() from last_error

    def _tune_socket(self, sock: socket.socket) -> None:
        # paramiko's keepalive only sends; it never notices that nothing comes back. TCP keepalive and
        # TCP_USER_TIMEOUT make the kernel fail a connection whose peer vanished (no FIN, no RST), so
        # a silent network cut surfaces as SshConnectionLost within about a minute.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        interval = max(1, int(self._keepalive_s))
        for name, value in (
            ("TCP_KEEPIDLE", interval),
            ("TCP_KEEPINTVL", interval),
            ("TCP_KEEPCNT", 4),
            ("TCP_USER_TIMEOUT", interval * 4 * 1000),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    def _verify_host_key(self, transport: paramiko.Transport, target: SshTarget) -> str:
        presented = transport.get_remote_server_key()
        line = normalize_host_key(_key_line(presented))
        pinned = target.pinned_host_key
        if pinned is None:
            logger.info(
                "no pinned host key for %s:%d; trusting %s on first use",
                target.host,
                target.port,
                host_key_fingerprint(line),
            )
            return line
        if not _same_key(presented, pinned):
            raise HostKeyMismatch(host=target.host, port=target.port, expected=pinned, presented=line)
        return line

    def _authenticate(self, transport: paramiko.Transport, target: SshTarget, pkey: paramiko.PKey) -> None:
        where = f"{target.user}@{target.host}:{target.port}"
        try:
            remaining = transport.auth_publickey(target.user, pkey)
        except paramiko.AuthenticationException as e:
            raise SshAuthFailed(f"{where} refused our SSH key: {e}") from e
        except (paramiko.SSHException, OSError, EOFError) as e:
            logger.warning("connection to %s failed during authentication: %s", where, e)
            raise SshUnreachable(_unreachable(target)) from e
        if remaining or not transport.is_authenticated():
            raise SshAuthFailed(f"{where} requires further authentication ({', '.join(remaining)})")


def _unreachable(target: SshTarget) -> str:
    return f"cannot reach an SSH server at {target.host}:{target.port}"
