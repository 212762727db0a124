"""A TCP relay for fault tests: listens on 127.0.0.1 (a free port) and forwards every connection to
`target` (the loopback sshd, the S3 server, ...) until told to misbehave:

- `reset()`: every open connection is torn down with an RST on both sides (SO_LINGER 0), like a
  middlebox or a rebooted NAT dropping state. New connections are forwarded as before.
- `blackhole(new_connections=False)`: every open connection stops forwarding, in both directions,
  without being closed. Bytes that arrive are read and thrown away, so the senders' kernels see their
  data acknowledged and nobody gets an error: the peer has simply gone silent (a black-holed link,
  a dead NAT mapping). With `new_connections=True`, connections made afterwards are accepted and
  held silent too (the whole path is dead); `heal()` makes new connections work again.
- `close()`: stop listening and close everything (also on `with` exit).

`forwarded` counts the bytes relayed (both directions), so a test can black-hole "mid-transfer":
`relay.wait_forwarded(n)` waits until at least `n` bytes went through.

    with TcpRelay(("127.0.0.1", sshd.port)) as relay:
        ... connect to relay.host:relay.port ...
        relay.blackhole()
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

logger = logging.getLogger(__name__)

_CHUNK = 65536


class _Pair:
    """One relayed connection: the accepted client socket and the socket to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.blackholed = upstream is None
        self.closed = False


class TcpRelay:
    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.forwarded = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._blackhole_new = False
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"tcp-relay-{self.port}", daemon=True).start()

    # -- faults ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """RST every open connection, on both sides."""
        with self._lock:
            pairs, self._pairs = list(self._pairs), []
        for pair in pairs:
            self._close_pair(pair, rst=True)

    def blackhole(self, *, new_connections: bool = False) -> None:
        """Stop forwarding on every open connection without closing it; with `new_connections`, hold
        later connections silent too."""
        with self._lock:
            for pair in self._pairs:
                pair.blackholed = True
            if new_connections:
                self._blackhole_new = True

    def heal(self) -> None:
        """Forward new connections again (black-holed ones stay dead, as on a real network)."""
        with self._lock:
            self._blackhole_new = False

    def wait_forwarded(self, count: int, timeout: float = 30.0) -> None:
        """Wait until at least `count` bytes were relayed. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.forwarded < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.forwarded} of {count} bytes relayed after {timeout}s")
            time.sleep(0.01)

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            pairs, self._pairs = list(self._pairs), []
        for pair in pairs:
            self._close_pair(pair, rst=False)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with self._lock:
                silent = self._blackhole_new
            upstream = None
            if not silent:
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                    upstream.settimeout(None)
                except OSError as e:
                    logger.debug("relay %d: target %s refused: %s", self.port, self.target, e)
                    client.close()
                    continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, client, upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(pair, upstream, client), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket | None) -> None:
        while True:
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                if not pair.blackholed:  # a black hole never passes a FIN on either
                    self._close_pair(pair, rst=False)
                return
            if pair.blackholed or dst is None:
                continue  # swallowed: the sender's kernel acknowledged it, nobody will ever see it
            try:
                dst.sendall(data)
            except OSError:
                self._close_pair(pair, rst=False)
                return
            with self._lock:
                self.forwarded += len(data)

    def _close_pair(self, pair: _Pair, *, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            try:
                if rst:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
