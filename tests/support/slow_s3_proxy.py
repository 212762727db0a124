"""A small HTTP proxy in front of the test S3 server that makes some requests slow: a bucket whose HEADs
take seconds (what a loaded R2 or S3 endpoint does at times). Point a client's endpoint at `proxy.endpoint`;
every request is forwarded unchanged, the Host header included, so SigV4 signatures made for the proxy's
address still verify upstream. `head_delay_s` (changeable while it runs) delays each HEAD before it is
forwarded, `put_delay_s` each PUT; `heads` counts the HEADs seen and `heads_held` those being delayed
right now (a test that must act while a client waits on a slow HEAD looks at this, not at a count that
may have moved before it looked).

`hold_puts_after(n, key_part)` lets the first n PUTs whose path contains `key_part` through and holds
every later one (`puts_held` counts them) until `release_puts()`: a test that must act in the middle of
an upload gets a moment that cannot pass before it looks, however fast the machine. A held PUT whose
client went away meanwhile is dropped, as a server drops a truncated upload.

Plain HTTP/1.0 with one request per connection: enough for boto3 and s5cmd, and nothing to get wrong
about keep-alive."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}


class SlowS3Proxy:
    def __init__(self, upstream: str, *, head_delay_s: float = 0.0, put_delay_s: float = 0.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.head_delay_s = head_delay_s
        self.put_delay_s = put_delay_s  # each PUT (an uploaded part) waits this long: uploads that take a while
        self.heads = 0
        self.heads_held = 0
        self.puts_forwarded = 0
        self.puts_held = 0
        self._hold_after: int | None = None
        self._hold_key_part = ""
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:
                """Quiet: a line per request would bury a failing test's output."""

            def _forward(self) -> None:
                if self.command == "HEAD":
                    with proxy._lock:
                        proxy.heads += 1
                        proxy.heads_held += 1
                    try:
                        time.sleep(proxy.head_delay_s)
                    finally:
                        with proxy._lock:
                            proxy.heads_held -= 1
                if self.command == "PUT" and proxy.put_delay_s:
                    time.sleep(proxy.put_delay_s)
                if self.command == "PUT":
                    proxy._maybe_hold(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = self.rfile.read(length) if length else None
                except OSError:
                    return  # the client went away mid-body: nothing to forward
                if body is not None and len(body) < length:
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP:
                            conn.putheader(name, value)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    self.send_response_only(resp.status, resp.reason)
                    for name, value in resp.getheaders():
                        if name.lower() not in _HOP_BY_HOP:
                            self.send_header(name, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        while chunk := resp.read(65536):
                            self.wfile.write(chunk)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="slow-s3-proxy", daemon=True)

    def hold_puts_after(self, n: int, key_part: str = "") -> None:
        with self._lock:
            self._hold_after, self._hold_key_part = n, key_part
            self._released.clear()

    def release_puts(self) -> None:
        self._released.set()

    def _maybe_hold(self, path: str) -> None:
        with self._lock:
            if self._hold_after is None or self._hold_key_part not in path:
                return
            if self.puts_forwarded < self._hold_after:
                self.puts_forwarded += 1
                return
            self.puts_held += 1
        self._released.wait(timeout=300)
        with self._lock:
            self.puts_held -= 1

    def __enter__(self) -> SlowS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
