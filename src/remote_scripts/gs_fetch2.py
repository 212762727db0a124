"""The format-2 restore data path: fetch whole objects (packs: groups or runs
of blocks; blocks of their own, as earlier writers stored them) in stream order with a bounded
read-ahead, verify and decode each chunk, and hand the chunks' raw bytes on in order.

Drop-in for gs_fetch.PartFetcher (next()/release()/close(), `ctx`, `spent`), so restore.py feeds the
same PartStream, member gate and `tar -x` as for format 1.

s5cmd has no ranged GET, so an object is fetched whole. A static plan, made from the manifest before
any download, decides which fetch ("load") serves each chunk: a chunk whose object was loaded for
one of the last `window + 2` loads uses that load (a pack that serves a run of groups, a run
of blocks that serves a file's consecutive blocks, a repeated zero block; this is the small pack cache), otherwise the object is loaded again. `window` objects
are read ahead and `window` chunks decoded ahead (read-ahead by bytes, as many as format 1's window
of 32 MiB parts, was measured: more CPU and memory, no faster, on a 2-core host). A load's buffer
(one pool per kind: blocks, packs) is recycled once every chunk planned on it is decoded, so about
2 x window + 2 object buffers and window decoded chunks exist at once, whatever the snapshot size.
Decoded bytes are checked against raw_size and, for every chunk the snapshot reused (`new: false`) or
whose codec has no frame checksum, against raw_sha256 (the chunk's identity: a frame checksum only
says the frame is intact, not that it is this chunk). Stored bytes are checked against their SHA-256
before decoding, except where the raw digest is checked anyway and the decoder is safe on any input
(zstd): one hash per chunk instead of two on the reused bulk of an incremental snapshot.
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


def _kind(key: str) -> str:
    """The buffer pool of an object: "chunks/" (one block) or "packs/"."""
    return "chunks/" if key.startswith("chunks/") else "packs/"


class _Load:
    __slots__ = ("obj", "refs", "future", "buf")

    def __init__(self, obj: int) -> None:
        self.obj, self.refs = obj, 0
        self.future: Optional[Future] = None
        self.buf: Optional[bytearray] = None


class ChunkFetcher:
    """Ordered iterator over verified, decoded chunks of a v2 manifest. close() when done."""

    def __init__(
        self,
        *,
        ctx: Context,
        s5: S5,
        store_prefix: str,
        manifest: Dict[str, Any],
        codecs: Dict[str, Codec],
        window: int,
    ) -> None:
        self.ctx, self.s5, self.prefix, self.codecs = ctx, s5, store_prefix, codecs
        self.objects, self.chunks = manifest["objects"], manifest["chunks"]
        self.window = max(1, window)
        self.lock = threading.Lock()
        self.spent = {"download_s": 0.0, "verify_s": 0.0, "decode_s": 0.0}
        self.loads: List[_Load] = []
        self.plan: List[int] = []
        recent: Dict[int, int] = {}
        for chunk in self.chunks:
            j = recent.get(chunk["object"])
            if j is None or j < len(self.loads) - (self.window + 2):
                j = recent[chunk["object"]] = len(self.loads)
                self.loads.append(_Load(chunk["object"]))
            self.loads[j].refs += 1
            self.plan.append(j)
        # Recycled object buffers, one pool per kind: a 16 MiB block need not hold a 36 MiB pack.
        self.obj_size = {
            kind: 1 + max([o["size"] for o in self.objects if o["key"].startswith(kind)] or [0])
            for kind in ("chunks/", "packs/")
        }
        self.raw_size = 1 + max(c["raw_size"] for c in self.chunks)
        self._obj_free: Dict[str, List[bytearray]] = {"chunks/": [], "packs/": []}
        self._raw_free: List[bytearray] = []
        self.fetch_pool = ThreadPoolExecutor(self.window, thread_name_prefix="fetch")
        self.decode_pool = ThreadPoolExecutor(max(1, min(self.window, usable_cpus())), thread_name_prefix="decode")
        self.queue: Deque[Future] = deque()
        self.next_chunk = 0
        self.next_load = 0
        self.fetches = 0

    # ---- buffers ---------------------------------------------------------------------------------
    def _take(self, free: List[bytearray], size: int) -> bytearray:
        with self.lock:
            return free.pop() if free else bytearray(size)

    def _unref(self, load: _Load) -> None:
        with self.lock:
            load.refs -= 1
            if load.refs == 0 and load.buf is not None:
                self._obj_free[_kind(self.objects[load.obj]["key"])].append(load.buf)
                load.buf = None

    def release(self, token: Any) -> None:
        """Give back what next() returned first; no view of it may be used afterwards."""
        if isinstance(token, _Load):
            self._unref(token)
        else:
            with self.lock:
                self._raw_free.append(token)

    # ---- scheduling ------------------------------------------------------------------------------
    def _prime(self) -> None:
        while self.next_chunk < len(self.chunks) and len(self.queue) < self.window:
            i = self.next_chunk
            horizon = min(len(self.loads), self.plan[i] + self.window)  # objects read ahead
            while self.next_load < max(horizon, self.plan[i] + 1):
                load = self.loads[self.next_load]
                load.future = self.fetch_pool.submit(self._fetch, load)
                self.next_load += 1
            self.queue.append(self.decode_pool.submit(self._chunk, i))
            self.next_chunk += 1

    def next(self) -> Optional[Tuple[Any, memoryview]]:
        """(token, view of the decoded bytes) of the next chunk, or None after the last; hand the
        token back with release(). Raises the first failure of any chunk already finished."""
        self._prime()
        if not self.queue:
            return None
        for fut in list(self.queue):
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        data = self.queue.popleft().result()
        self._prime()
        return data

    def close(self) -> None:
        for fut in self.queue:
            fut.cancel()
        for load in self.loads[: self.next_load]:
            if load.future is not None and not load.future.done():
                load.future.cancel()  # not started yet: never downloaded
        self.decode_pool.shutdown(wait=False)
        self.fetch_pool.shutdown(wait=False)

    def _add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.spent[stage] += seconds

    # ---- work ------------------------------------------------------------------------------------
    def _fetch(self, load: _Load) -> memoryview:
        obj = self.objects[load.obj]
        key, size = obj["key"], obj["size"]
        t0 = time.monotonic()
        kind = _kind(key)
        buf = self._take(self._obj_free[kind], self.obj_size[kind])
        try:
            got = self.s5.cat_into(self.prefix + key, buf, size)
        except NotFound:
            self._give_obj(kind, buf)
            raise ScriptError("part_missing", "object %s is missing from the bucket" % key) from None
        except BaseException:
            self._give_obj(kind, buf)
            raise
        self._add("download_s", time.monotonic() - t0)
        with self.lock:
            self.fetches += 1
        if got != size:
            self._give_obj(kind, buf)
            if got < size:  # cat_into returns short only when the bucket's own object is that short
                raise ScriptError(
                    "part_truncated", "object %s is %d bytes in the bucket, manifest says %d" % (key, got, size)
                )
            raise ScriptError("part_corrupt", "object %s is longer than the %d bytes of the manifest" % (key, size))
        with self.lock:
            load.buf = buf
        return memoryview(buf)[:size]

    def _give_obj(self, kind: str, buf: bytearray) -> None:
        with self.lock:
            self._obj_free[kind].append(buf)

    def _chunk(self, i: int) -> Tuple[Any, memoryview]:
        chunk, load = self.chunks[i], self.loads[self.plan[i]]
        assert load.future is not None
        view = load.future.result()
        key = self.objects[load.obj]["key"]
        t0 = time.monotonic()
        stored = view[chunk["offset"] : chunk["offset"] + chunk["stored_size"]]
        plain = chunk["codec"] == "none"  # stored bytes are the raw bytes (sha256 == raw_sha256)
        codec = self.codecs[chunk["codec"]]
        self_checked = plain or codec.checks_output(stored)
        hash_raw = not chunk["new"] or not self_checked
        # One SHA-256 per chunk where one suffices: a chunk whose decoded bytes are hashed anyway (most
        # of an incremental snapshot: reused chunks) by a decoder safe on any input skips the stored
        # bytes' hash; damage then shows as a decode error or the wrong raw digest. Saves hashing the
        # stored size (~1.5 GB per 2 GB restored) against format 1, which hashes stored bytes only.
        if plain or not (hash_raw and codec.decodes_untrusted_input):
            if hashlib.sha256(stored).hexdigest() != chunk["sha256"]:
                self._unref(load)
                raise ScriptError(
                    "part_corrupt",
                    "chunk %d (%s...) in %s does not match its SHA-256" % (i, chunk["raw_sha256"][:12], key),
                )
        t1 = time.monotonic()
        self._add("verify_s", t1 - t0)
        if plain:
            return load, stored  # the verified stored bytes are the raw bytes; release() unrefs the load
        raw_size = chunk["raw_size"]
        rbuf = self._take(self._raw_free, self.raw_size)
        try:
            n = codec.decompress_into(stored, memoryview(rbuf)[: raw_size + 1])
        except BaseException:
            self.release(rbuf)
            raise
        finally:
            del stored
            self._unref(load)
        t2 = time.monotonic()
        self._add("decode_s", t2 - t1)
        if n != raw_size:
            self.release(rbuf)
            raise ScriptError(
                "part_corrupt",
                "chunk %d in %s decodes to %s bytes, manifest says %d"
                % (i, key, n if n <= raw_size else "more", raw_size),
            )
        raw = memoryview(rbuf)[:n]
        # Every chunk this snapshot did not store itself (`new: false`: told by known_chunks, found by a
        # resume, a repeat), even when the zstd frame checksum matched: that checksum covers what the
        # frame holds, not which chunk it is. An object that vouches for a digest it does not hold (a
        # lying pack or manifest of a previous host of the machine) decodes cleanly to the wrong bytes
        # and only this check tells. A chunk the snapshot's own run stored was hashed from these raw
        # bytes and compressed by the same writer (its stored SHA-256 guards it since); skipping those
        # keeps a full restore as fast as before.
        if hash_raw and hashlib.sha256(raw).hexdigest() != chunk["raw_sha256"]:
            self.release(rbuf)
            raise ScriptError("part_corrupt", "chunk %d in %s decodes to bytes that do not match raw_sha256" % (i, key))
        self._add("verify_s", time.monotonic() - t2)
        return rbuf, raw
