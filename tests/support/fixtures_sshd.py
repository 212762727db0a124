"""The loopback sshd: a real OpenSSH server on 127.0.0.1 standing in for a GPU host.

`sshd` is one server for the whole session (do not stop it or change its host key); `sshd_factory`
makes extra servers a test may stop, restart or re-key, and stops them afterwards. A missing
/usr/sbin/sshd fails the test loudly: `make test` installs openssh-server, so skipping would only hide
a broken setup."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.sshd import LoopbackSshd


def _started(server: LoopbackSshd) -> LoopbackSshd:
    try:
        server.start()
    except RuntimeError as e:
        server.cleanup()
        pytest.fail(str(e), pytrace=False)
    return server


@pytest.fixture(scope="session")
def sshd() -> Iterator[LoopbackSshd]:
    """A running loopback sshd shared by the session: host, port, user, client_key_path, host_public_key."""
    server = _started(LoopbackSshd())
    yield server
    server.stop()
    server.cleanup()


@pytest.fixture
def sshd_factory() -> Iterator[Callable[..., LoopbackSshd]]:
    """`sshd_factory(start=True, sftp=True)`: a private LoopbackSshd for this test, stopped and removed
    after it (`sftp=False`: a server without the SFTP subsystem)."""
    servers: list[LoopbackSshd] = []

    def make(*, start: bool = True, sftp: bool = True, sftp_read_only: bool = False) -> LoopbackSshd:
        server = LoopbackSshd(sftp=sftp, sftp_read_only=sftp_read_only)
        servers.append(server)
        return _started(server) if start else server

    yield make
    for server in servers:
        server.stop()
        server.cleanup()
