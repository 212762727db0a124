"""The restore data path: download parts with a bounded read-ahead window, verify, decode, and
present them as one ordered byte stream.

Each part is checked against the manifest (size, then SHA-256 of the stored bytes) before it is
decoded; decoded bytes are checked against raw_size, and by the codec's own checksum (zstd frames
carry XXH64) or, for codecs without one, against raw_sha256, before they are handed on. At most
`window` parts are downloaded or decoded ahead of the consumer, so memory stays near
(window + 1) x (part_size + stored part) whatever the snapshot size; nothing touches local disk.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, List, Optional, Tuple

from gs_codecs import Codec
from gs_common import Context, ScriptError
from gs_s3 import S5, NotFound
from gs_tuning import usable_cpus


class PartFetcher:
    """Ordered iterator over verified, decoded parts. Call close() when done (also on failure)."""

    def __init__(
        self, *, ctx: Context, s5: S5, prefix: str, parts: List[Dict[str, Any]], codecs: Dict[str, Codec], window: int
    ) -> None:
        self.ctx, self.s5, self.prefix, self.parts, self.codecs = ctx, s5, prefix, parts, codecs
        self.window = max(1, window)
        self.cpu = threading.Semaphore(max(1, min(self.window, usable_cpus())))
        self.pool = ThreadPoolExecutor(self.window, thread_name_prefix="fetch")
        self.queue: Deque[Future] = deque()
        self.submitted = 0
        self.spent = {"download_s": 0.0, "verify_s": 0.0, "decode_s": 0.0}
        self.lock = threading.Lock()
        # Recycled part buffers (one spare byte to notice over-long data): fresh 32 MiB buffers per
        # part would be zero-filled and page-faulted in each time. At most ~2 x (window + 1) exist.
        self.bufsize = 1 + max([max(p["stored_size"], p["raw_size"]) for p in parts] or [0])
        self._pool: List[bytearray] = []

    def _take(self) -> bytearray:
        with self.lock:
            return self._pool.pop() if self._pool else bytearray(self.bufsize)

    def release(self, buf: bytearray) -> None:
        """Give back a buffer returned by next(); no view of it may be used afterwards."""
        with self.lock:
            self._pool.append(buf)

    def _prime(self) -> None:
        while len(self.queue) < self.window and self.submitted < len(self.parts):
            self.queue.append(self.pool.submit(self._fetch, self.parts[self.submitted]))
            self.submitted += 1

    def next(self) -> Optional[Tuple[bytearray, memoryview]]:
        """(buffer, view of the decoded bytes) of the next part, or None after the last one; hand the
        buffer back with release(). Raises the first failure of any part already finished, so a bad
        later part stops the restore early."""
        self._prime()
        if not self.queue:
            return None
        for fut in list(self.queue):
            if fut.done() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        data = self.queue.popleft().result()
        self._prime()
        return data

    def close(self) -> None:
        for fut in self.queue:
            fut.cancel()
        self.pool.shutdown(wait=False)

    def _add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.spent[stage] += seconds

    def _fetch(self, part: Dict[str, Any]) -> Tuple[bytearray, memoryview]:
        key, size, raw_size = part["key"], part["stored_size"], part["raw_size"]
        t0 = time.monotonic()
        sbuf = self._take()
        try:
            got = self.s5.cat_into(self.prefix + key, sbuf, size)
        except NotFound:
            raise ScriptError("part_missing", "part %s is missing from the bucket" % key) from None
        t1 = time.monotonic()
        if got < size:  # cat_into returns short only when the bucket's own object is that short
            raise ScriptError(
                "part_truncated", "part %s is %d bytes in the bucket, manifest says %d" % (key, got, size)
            )
        if got > size:
            raise ScriptError("part_corrupt", "part %s is longer than the %d bytes of the manifest" % (key, size))
        stored = memoryview(sbuf)[:size]
        if hashlib.sha256(stored).hexdigest() != part["sha256"]:
            raise ScriptError("part_corrupt", "part %s does not match its SHA-256" % key)
        t2 = time.monotonic()
        if part["codec"] == "none":
            if size != raw_size:
                raise ScriptError("part_corrupt", "raw part %s: stored and raw sizes differ" % key)
            self._add("download_s", t1 - t0)
            self._add("verify_s", t2 - t1)
            return sbuf, stored  # the verified stored bytes are the raw bytes
        codec = self.codecs[part["codec"]]
        self_checked = codec.checks_output(stored)
        rbuf = self._take()
        with self.cpu:
            n = codec.decompress_into(stored, memoryview(rbuf)[: raw_size + 1])
        del stored
        self.release(sbuf)
        t3 = time.monotonic()
        if n != raw_size:
            raise ScriptError(
                "part_corrupt",
                "part %s decodes to %s bytes, manifest says %d" % (key, n if n <= raw_size else "more", raw_size),
            )
        raw = memoryview(rbuf)[:n]
        if not self_checked and (
            part.get("raw_sha256") is None or hashlib.sha256(raw).hexdigest() != part["raw_sha256"]
        ):
            raise ScriptError("part_corrupt", "part %s decodes to bytes that do not match raw_sha256" % key)
        self._add("download_s", t1 - t0)
        self._add("decode_s", t3 - t2)
        self._add("verify_s", (t2 - t1) + (time.monotonic() - t3))
        return rbuf, raw


class PartStream:
    """read(n) over the concatenation of the fetcher's parts (tarfile's file object).

    Returned chunks are views into recycled part buffers. A buffer goes back to the fetcher only
    once at least HOLD_BYTES of later parts have been handed out: tarfile joins at most two of its
    64 KiB reads before copying, and GatedTee copies whatever it holds back, so no live view can
    point into a recycled buffer."""

    HOLD_BYTES = 1 << 20

    def __init__(self, fetcher: PartFetcher, on_part: Any) -> None:
        self.fetcher = fetcher
        self.on_part = on_part
        self.buf: Optional[bytearray] = None
        self.retired: Deque[Tuple[bytearray, int]] = deque()
        self.view = memoryview(b"")
        self.offset = 0
        self.total = 0
        self.eof = False

    def read(self, size: int) -> Any:
        while self.offset >= len(self.view):
            if self.eof:
                return b""
            self.fetcher.ctx.check()
            if self.buf is not None:
                self.retired.append((self.buf, len(self.view)))
                self.view, self.buf = memoryview(b""), None
                while len(self.retired) > 1 and sum(n for _, n in list(self.retired)[1:]) >= self.HOLD_BYTES:
                    self.fetcher.release(self.retired.popleft()[0])
            item = self.fetcher.next()
            if item is None:
                self.eof = True
                return b""
            self.buf, self.view = item
            self.offset = 0
            self.total += len(self.view)
            self.on_part(len(self.view))
        chunk = self.view[self.offset : self.offset + size]
        self.offset += len(chunk)
        return chunk
