"""ChannelReader's idea of "the remote process is done": exit status AND end of output."""

from __future__ import annotations

import os
import time

import pytest

from src.adapters.remote_channel import ChannelReader


class FakeChannel:
    """The parts of paramiko.Channel the reader uses, driven by the test."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.exit_status = -1
        self.eof_received = False
        self.closed = False
        self._r, self._w = os.pipe()  # select() needs a real descriptor

    def fileno(self) -> int:
        return self._r

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv_stderr_ready(self) -> bool:
        return False

    def recv(self, n: int) -> bytes:
        data, self.out = bytes(self.out[:n]), self.out[n:]
        return data

    def exit_status_ready(self) -> bool:
        return self.exit_status != -1


class LiveTransport:
    def is_active(self) -> bool:
        return True


@pytest.fixture
def channel():  # type: ignore[no-untyped-def]
    fake = FakeChannel()
    yield fake
    os.close(fake._r)
    os.close(fake._w)


def test_exit_status_before_the_last_output_is_not_the_end(channel):
    reader = ChannelReader(channel, transport=LiveTransport())  # type: ignore[arg-type]
    channel.exit_status = 0  # sshd reported the exit before relaying the final line
    assert not reader.finished
    channel.out += b'{"event": "result"}\n'
    assert not reader.finished
    assert reader.read(0.01)[0] == b'{"event": "result"}\n'
    assert not reader.finished
    channel.eof_received = True
    assert reader.finished and reader.exit_status() == 0


def test_a_server_that_never_sends_eof_is_believed_after_a_grace(channel, monkeypatch):
    reader = ChannelReader(channel, transport=LiveTransport())  # type: ignore[arg-type]
    monkeypatch.setattr(ChannelReader, "EOF_GRACE_S", 0.05)
    channel.exit_status = 3
    assert not reader.finished  # the grace starts now
    time.sleep(0.06)
    assert reader.finished and reader.exit_status() == 3
