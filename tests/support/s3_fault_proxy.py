"""An HTTP proxy in front of the S3 test server that injects the faults a real bucket shows.

    proxy = S3FaultProxy(upstream="http://127.0.0.1:8333").start()
    proxy.endpoint                       # point s5cmd / boto3 here instead of at the server
    proxy.rate = 0.2                     # 20% of requests get one of proxy.kinds at random
    proxy.plan(Fault("reset", method="GET", key_contains="part-", count=1))  # or exactly this one

Faults: `reset` answers a GET with its real status and headers, sends part of the body and then resets
the TCP connection (SO_LINGER 0: an RST, as a dropped NAT entry or a load balancer restart gives);
`500` and `503` answer with an S3 XML error body (503 is S3's `SlowDown`) without asking the server;
`stall` holds the request for `stall_s` seconds, then forwards it (a slow bucket). Requests are forwarded
with their own Host header and bytes, so SigV4 signatures still verify at the server.

Everything is counted in `proxy.stats` (requests, and faults by kind) so a test can say the fault did
happen. Threaded: one thread per client connection, HTTP/1.1 keep-alive like a real endpoint.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

KINDS = ("reset", "500", "503", "stall")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
_ERROR_BODY = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    """A fault for the next `count` requests that match (method, and a substring of the path)."""

    kind: str
    method: str | None = None
    key_contains: str = ""
    count: int = 1
    keep_fraction: float = 0.1  # `reset`: share of the body sent before the reset

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and self.key_contains in path


@dataclass
class ProxyStats:
    requests: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, fault) of each fault


class S3FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        kinds: tuple[str, ...] = KINDS,
        stall_s: float = 3.0,
        seed: int | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rate = rate
        self.kinds = kinds
        self.stall_s = stall_s
        self.random = random.Random(seed)
        self.stats = ProxyStats()
        self._planned: list[Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return "http://127.0.0.1:%d" % self._server.server_address[1]

    def plan(self, *faults: Fault) -> None:
        """Inject exactly these faults (before any random ones) into the next matching requests."""
        with self._lock:
            self._planned.extend(faults)

    def choose(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any; counts it."""
        with self._lock:
            self.stats.requests += 1
            fault: Fault | None = None
            for planned in self._planned:
                if planned.count > 0 and planned.matches(method, path):
                    planned.count -= 1
                    fault = planned
                    break
            if fault is None and self.rate > 0 and self.random.random() < self.rate:
                kind = self.random.choice(self.kinds)
                if kind == "reset" and method != "GET":
                    kind = "503"  # a reset mid-body needs a body to cut; the others fit any request
                fault = Fault(kind, keep_fraction=self.random.uniform(0.0, 0.9))
            if fault is not None:
                self.stats.faults[fault.kind] = self.stats.faults.get(fault.kind, 0) + 1
                self.stats.log.append((method, path, fault.kind))
            return fault

    def start(self) -> S3FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: S3FaultProxy

    def log_message(self, fmt: str, *args: object) -> None:  # quiet: tests print the stats instead
        logger.debug("s3-proxy: " + fmt, *args)

    def _any(self) -> None:
        body = self._read_body()
        fault = self.owner.choose(self.command, self.path)
        if fault is not None and fault.kind in _ERROR_BODY:
            self._answer_error(fault.kind)
            return
        if fault is not None and fault.kind == "stall":
            time.sleep(self.owner.stall_s)
        status, reason, headers, upstream, conn = self._forward(body)
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0") or 0)
            cut = int(length * fault.keep_fraction) if fault is not None and fault.kind == "reset" else -1
            sent = 0
            while self.command != "HEAD":
                want = 65536 if cut < 0 else min(65536, cut - sent)
                chunk = upstream.read(want) if want > 0 else b""
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
            if cut >= 0 and self.command == "GET":
                self.wfile.flush()
                self._reset()
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(
        self, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], http.client.HTTPResponse, http.client.HTTPConnection]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP and name.lower() not in ("transfer-encoding", "content-length"):
                conn.putheader(name, value)
        if body or self.command in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        status, reason = resp.status, resp.reason
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        if resp.getheader("Transfer-Encoding", "").lower() == "chunked":
            data = resp.read()  # re-frame with a length: simpler than relaying chunks
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
            headers.append(("Content-Length", str(len(data))))
            resp = _Buffered(data)  # type: ignore[assignment]
        return status, reason, headers, resp, conn

    def _answer_error(self, kind: str) -> None:
        code, message = _ERROR_BODY[kind]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
            "<Resource>%s</Resource><RequestId>fault-proxy</RequestId></Error>" % (code, message, self.path)
        )
        data = body.encode() if self.command != "HEAD" else b""
        self.send_response_only(int(kind), "Internal Server Error" if kind == "500" else "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        if kind == "503":
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def _reset(self) -> None:
        """Abort the client connection with an RST instead of a FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the connection we reset on purpose
            pass


class _Buffered:
    """A fully read upstream body with the read(n) of an HTTPResponse."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk
