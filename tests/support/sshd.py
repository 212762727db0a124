"""A real OpenSSH server on 127.0.0.1 for tests: the loopback "GPU host".

`LoopbackSshd` runs `/usr/sbin/sshd -D` with its own config, a fresh ed25519 host key and a fresh
client key pair whose public half is the only authorized key. The login user is whoever runs the
tests (root in CI; as another user sshd runs unprivileged and only that user can log in). It can be
used outside pytest:

    with LoopbackSshd() as sshd:
        print(sshd.host, sshd.port, sshd.user, sshd.client_key_path, sshd.host_public_key)
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.services import free_port

SSHD_PATH = "/usr/sbin/sshd"
MISSING_SSHD = f"{SSHD_PATH} is missing: run `make test`, which installs openssh-server"
_PRIVSEP_DIR = Path("/run/sshd")


def write_key_pair(private_path: Path) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 600); return its public line."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode()


def processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields after the command name: state, ppid, pgrp, ...) of every process, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process exited while we looked
        yield int(stat.parent.name), fields


def _children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    return [child for child, fields in processes() if int(fields[1]) == pid]


class LoopbackSshd:
    """A throwaway sshd. `start()` blocks until it answers with its banner; `stop()` is idempotent."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        sshd_path: str = SSHD_PATH,
        sftp: bool = True,
        sftp_read_only: bool = False,
    ) -> None:
        """`sftp=False`: no `Subsystem sftp` line, as in minimal images and some container sshd
        configs; a client asking for the subsystem is refused and only exec channels work.
        `sftp_read_only`: the subsystem answers but refuses every write (`internal-sftp -R`)."""
        self.host = host
        self.sftp = sftp
        self.sftp_read_only = sftp_read_only
        self.port = port or free_port(host)
        self.user = getpass.getuser()
        self._sshd_path = sshd_path
        self._dir = Path(tempfile.mkdtemp(prefix="gpusnap-sshd-"))
        self._dir.chmod(0o755)  # the unprivileged sshd child must reach authorized_keys
        self.client_key_path = self._dir / "client_ed25519"
        self._authorized = self._dir / "authorized_keys"
        self._authorized.write_text(write_key_pair(self.client_key_path) + "\n")
        self._host_key_path = self._dir / "host_ed25519"
        self.host_public_key = write_key_pair(self._host_key_path)
        self.log_path = self._dir / "sshd.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LoopbackSshd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout: float = 10.0) -> None:
        """Start sshd and wait until it sends its banner. Raises RuntimeError (with sshd's log) if not."""
        if not os.access(self._sshd_path, os.X_OK):
            raise RuntimeError(MISSING_SSHD)
        if os.geteuid() == 0:
            # Privilege separation chroots into this directory; Debian creates it only at boot.
            _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        config = self._dir / "sshd_config"
        config.write_text(self._config())
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self._sshd_path, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._banner_ok():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not start on {self.host}:{self.port}:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the listener and every connection it serves. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        self._kill_connections(process.pid)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cleanup(self) -> None:
        """Remove the keys, config and log (after `stop`)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def authorize_key_of(self, private_key_path: str | Path) -> None:
        """Also accept the client key at `private_key_path` (another server's client key, say), so that a
        test can change this server's host key and nothing else."""
        key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        with open(self._authorized, "a") as f:
            f.write(line.decode() + "\n")

    def restart_with_new_host_key(self) -> None:
        """Same address, new host key: what a client sees when the machine behind an address changed."""
        self.stop()
        self.host_public_key = write_key_pair(self._host_key_path)
        self.start()

    def drop_connections(self) -> None:
        """SIGKILL every per-connection sshd process, keeping the listener: clients see the TCP
        connection die without an SSH goodbye, as in a network cut. Commands they ran lose their pipes."""
        if self._process is not None:
            self._kill_connections(self._process.pid)

    def _kill_connections(self, listener_pid: int) -> None:
        # Kill the sshd descendants only (not the user's commands), so the connection dies abruptly.
        pending = _children(listener_pid)
        while pending:
            pid = pending.pop()
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "sshd":
                pending.extend(_children(pid))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _config(self) -> str:
        return "\n".join(
            [
                f"ListenAddress {self.host}:{self.port}",
                f"HostKey {self._host_key_path}",
                f"PidFile {self._dir / 'sshd.pid'}",
                f"AuthorizedKeysFile {self._authorized}",
                "StrictModes no",
                "UsePAM no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                f"AllowUsers {self.user}",
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "LogLevel VERBOSE",
                *([f"Subsystem sftp internal-sftp{' -R' if self.sftp_read_only else ''}"] if self.sftp else []),
                "",
            ]
        )
