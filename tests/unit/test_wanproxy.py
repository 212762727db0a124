"""bench/wanproxy.py shapes what passes through it: a per-connection rate, a link shared by all
connections, a one-way delay. Only lower bounds on time are asserted (shaping guarantees them; a
loaded machine can only make things slower)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture
def sink() -> Iterator[tuple[str, int]]:
    """A TCP server that reads everything and answers each 1-byte message, then 'ok' at EOF."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    conn.sendall(b"ok")
                    return
                if data == b"?":
                    conn.sendall(b"!")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()
    stop.set()
    srv.close()


def proxy(
    upstream: tuple[str, int], conn_rate: str, link_rate: str, delay_ms: float
) -> tuple[subprocess.Popen, tuple[str, int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(BENCH, "wanproxy.py"),
            "--upstream",
            "%s:%d" % upstream,
            "--conn-rate",
            conn_rate,
            "--link-rate",
            link_rate,
            "--delay-ms",
            str(delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split()  # type: ignore[union-attr]
    host, port = line[1].rsplit(":", 1)
    return proc, (host, int(port))


def send(addr: tuple[str, int], nbytes: int) -> float:
    t0 = time.monotonic()
    with socket.create_connection(addr) as s:
        s.sendall(b"x" * nbytes)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(2) == b"ok"
    return time.monotonic() - t0


def test_a_connection_is_capped_and_the_link_is_shared(sink: tuple[str, int]) -> None:
    proc, addr = proxy(sink, "1M", "1.5M", 1)
    try:
        assert send(addr, 1_000_000) >= 0.9  # 1 MB at 1 MB/s
        times: list[float] = []
        threads = [threading.Thread(target=lambda: times.append(send(addr, 600_000))) for _ in range(3)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # 1.8 MB over a 1.5 MB/s link: 1.2 s at least, though each connection alone could do 0.6 s
        assert len(times) == 3 and time.monotonic() - t0 >= 1.1
    finally:
        proc.terminate()
        proc.wait(10)


def test_each_direction_is_delayed_and_a_new_connection_pays_a_round_trip(sink: tuple[str, int]) -> None:
    proc, addr = proxy(sink, "100M", "100M", 100)
    try:
        t0 = time.monotonic()
        with socket.create_connection(addr) as s:
            s.sendall(b"?")
            assert s.recv(1) == b"!"
            first = time.monotonic() - t0
            t1 = time.monotonic()
            s.sendall(b"?")
            assert s.recv(1) == b"!"
            second = time.monotonic() - t1
        assert first >= 0.39 and second >= 0.19  # handshake RTT + RTT; then one RTT
    finally:
        proc.terminate()
        proc.wait(10)
