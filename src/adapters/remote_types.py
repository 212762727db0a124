"""Values the SSH adapter takes and returns: the target, a command's result, host key strings."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass


def normalize_host_key(text: str) -> str:
    """`"<type> <base64>"` from an OpenSSH public key line (a trailing comment is dropped).

    Raises `ValueError` when the line is not a well-formed public key (the base64 blob must decode
    and carry the same key type it is labelled with)."""
    parts = text.strip().split()
    if len(parts) < 2:
        raise ValueError("host key must look like 'ssh-ed25519 AAAA...'")
    key_type, blob_b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded_type = blob[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError) as e:
        raise ValueError("host key blob is not valid base64 of an SSH public key") from e
    if embedded_type != key_type:
        raise ValueError(f"host key is labelled {key_type!r} but holds a {embedded_type!r} key")
    return f"{key_type} {blob_b64}"


def host_key_fingerprint(host_key: str) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a one-line public key (what `ssh-keygen -l` shows)."""
    blob = base64.b64decode(normalize_host_key(host_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class SshTarget:
    """Where to connect. `pinned_host_key` is the OpenSSH one-line key recorded on first use, or None
    to trust whatever key the host presents (the caller then stores `RemoteSession.host_key`)."""

    host: str
    port: int = 22
    user: str = "root"
    pinned_host_key: str | None = None

    def __post_init__(self) -> None:
        if not self.host.strip():
            raise ValueError("SSH host is empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"SSH port {self.port} is out of range")
        if not self.user:
            raise ValueError("SSH user is empty")
        if self.pinned_host_key is not None:
            object.__setattr__(self, "pinned_host_key", normalize_host_key(self.pinned_host_key))


@dataclass(frozen=True)
class CommandResult:
    """Outcome of `RemoteSession.run`: exit status (-1 when the process died without one, e.g. by a
    signal) and its output decoded as UTF-8 (undecodable bytes replaced)."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0
