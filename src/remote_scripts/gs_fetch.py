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
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, List, Optional

from gs_codecs import Codec, decode_part
from gs_common import Context, ScriptError
from gs_s3 import S5, NotFound


class PartFetcher:
    """Ordered iterator over verified, decoded parts. Call close() when done (also on failure)."""

    def __init__(self, *, ctx: Context, s5: S5, prefix: str, parts: List[Dict[str, Any]],
                 codecs: Dict[str, Codec], window: int) -> None:
        self.ctx, self.s5, self.prefix, self.parts, self.codecs = ctx, s5, prefix, parts, codecs
        self.window = max(1, window)
        self.cpu = threading.Semaphore(max(1, min(self.window, os.cpu_count() or 1)))
        self.pool = ThreadPoolExecutor(self.window, thread_name_prefix="fetch")
        self.queue: Deque[Future] = deque()
        self.submitted = 0
        self.spent = {"download_s": 0.0, "verify_s": 0.0, "decode_s": 0.0}
        self.lock = threading.Lock()

    def _prime(self) -> None:
        while len(self.queue) < self.window and self.submitted < len(self.parts):
            self.queue.append(self.pool.submit(self._fetch, self.parts[self.submitted]))
            self.submitted += 1

    def next(self) -> Optional[Any]:
        """Decoded bytes of the next part, or None after the last one. Raises the first failure of
        any part already finished, so a bad later part stops the restore early."""
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

    def _fetch(self, part: Dict[str, Any]) -> Any:
        key, size = part["key"], part["stored_size"]
        t0 = time.monotonic()
        try:
            stored = self.s5.cat(self.prefix + key, size)
        except NotFound:
            raise ScriptError("part_missing", "part %s is missing from the bucket" % key) from None
        t1 = time.monotonic()
        if len(stored) < size:
            raise ScriptError("part_truncated", "part %s has %d bytes, manifest says %d" % (key, len(stored), size))
        if len(stored) > size:
            raise ScriptError("part_corrupt", "part %s is longer than the %d bytes of the manifest" % (key, size))
        if hashlib.sha256(stored).hexdigest() != part["sha256"]:
            raise ScriptError("part_corrupt", "part %s does not match its SHA-256" % key)
        t2 = time.monotonic()
        codec = self.codecs.get(part["codec"])
        self_checked = codec is not None and codec.checks_output(stored)
        with self.cpu:
            raw = decode_part(self.codecs, part["codec"], stored, part["raw_size"])
        del stored
        t3 = time.monotonic()
        if len(raw) != part["raw_size"]:
            raise ScriptError("part_corrupt", "part %s decodes to %d bytes, manifest says %d"
                              % (key, len(raw), part["raw_size"]))
        if not self_checked and hashlib.sha256(raw).hexdigest() != part["raw_sha256"]:
            raise ScriptError("part_corrupt", "part %s decodes to bytes that do not match raw_sha256" % key)
        self._add("download_s", t1 - t0)
        self._add("decode_s", t3 - t2)
        self._add("verify_s", (t2 - t1) + (time.monotonic() - t3))
        return raw


class PartStream:
    """read(n) over the concatenation of the fetcher's parts (tarfile's file object)."""

    def __init__(self, fetcher: PartFetcher, on_part: Any) -> None:
        self.fetcher = fetcher
        self.on_part = on_part
        self.view = memoryview(b"")
        self.offset = 0
        self.total = 0
        self.eof = False

    def read(self, size: int) -> Any:
        while self.offset >= len(self.view):
            if self.eof:
                return b""
            self.fetcher.ctx.check()
            data = self.fetcher.next()
            if data is None:
                self.eof = True
                return b""
            self.view, self.offset = memoryview(data), 0
            self.total += len(data)
            self.on_part(len(data))
        chunk = self.view[self.offset:self.offset + size]
        self.offset += len(chunk)
        return chunk
