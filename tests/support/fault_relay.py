"""A TCP relay (in front of the loopback sshd) that breaks live connections on demand.

    relay = FaultRelay(("127.0.0.1", sshd.port)).start()
    relay.port                # connect here instead of to sshd
    relay.reset_all()         # every live connection gets an RST on both sides (a dropped NAT entry)
    relay.blackhole = True    # from now on bytes are swallowed in both directions, sockets stay open
    relay.reset_after_bytes = 200_000  # reset each connection once this many bytes went through it

A reset is SO_LINGER 0 then close: the peer sees ECONNRESET, not an orderly FIN. New connections are
accepted and relayed normally after a reset (a reconnecting client gets through), unless `refuse` is set.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading

logger = logging.getLogger(__name__)


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.bytes = 0
        self.closed = False

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


class FaultRelay:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.blackhole = False
        self.refuse = False
        self.reset_after_bytes: int | None = None
        self.resets = 0
        self.connections = 0
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        return self._listener.getsockname()[1]

    def start(self) -> FaultRelay:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        threading.Thread(target=self._accept, name="fault-relay", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self.reset_all(count=False)

    def __enter__(self) -> FaultRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def live(self) -> int:
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed)

    def reset_all(self, count: bool = True) -> int:
        """Reset every live connection; returns how many."""
        with self._lock:
            pairs = [p for p in self._pairs if not p.closed]
            self._pairs = []
        for pair in pairs:
            pair.reset()
        if count:
            self.resets += len(pairs)
        return len(pairs)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                _Pair(client, client).reset()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.connections += 1
            threading.Thread(target=self._pump, args=(pair,), name="fault-relay-pump", daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        socks = [pair.client, pair.upstream]
        try:
            while not pair.closed:
                readable, _, _ = select.select(socks, [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        pair.reset()
                        return
                    if self.blackhole:
                        continue  # swallowed: the sender's writes "succeed", nothing ever arrives
                    other = pair.upstream if sock is pair.client else pair.client
                    other.sendall(data)
                    pair.bytes += len(data)
                    if self.reset_after_bytes is not None and pair.bytes >= self.reset_after_bytes:
                        self.resets += 1
                        pair.reset()
                        return
        except (OSError, ValueError):  # closed under us by reset_all/stop
            pair.reset()
