"""The format-2 snapshot data path: tar stdout -> chunks -> hash -> (new only) compress -> upload.

Overlapped and bounded like gs_pipeline.PartUploader: the reader (calling thread) takes a slot before
it fills a chunk buffer, the worker that finishes the chunk gives it back, so at most `parallelism`
chunk buffers (16 MiB blocks or 4 MiB groups) plus their compressed copies and the pack buffers are
alive, whatever the workspace size. Every chunk is
hashed (SHA-256 in worker threads: hashlib releases the GIL); only chunks the store does not hold
are compressed and uploaded into packs (gs_packer): groups into group packs, blocks into runs (a
file's consecutive new blocks, in the order workers finish them, up to `pack_size` per object). Old
snapshots' blocks stored as their own object `chunks/<raw sha256>` are still read and reused.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from gs_chunker import Chunker
from gs_chunkstore import ChunkIndex
from gs_codecs import Codec, encode_part
from gs_common import Context, ScriptError, TarCreate
from gs_packer import Loc, PackBuilder, Sealed
from gs_tuning import usable_cpus

logger = logging.getLogger("gpusnap.remote")


class ChunkUploader:
    """Runs tar and turns its stream into stored chunks. One instance per snapshot run."""

    def __init__(
        self,
        *,
        ctx: Context,
        codec: Codec,
        index: ChunkIndex,
        put: Callable[[str, Any, Dict[str, str]], None],
        block_size: int,
        pack_size: int,
        group_max: int,
        large_min: int,
        modulus: int,
        parallelism: int,
        total: Callable[[], Optional[int]],
    ) -> None:
        self.ctx, self.codec, self.index, self.put = ctx, codec, index, put
        self.block_size, self.group_max, self.large_min, self.modulus = block_size, group_max, large_min, modulus
        self.parallelism, self.total = parallelism, total  # estimated stream bytes; None while unknown
        self.packer = PackBuilder(pack_size, group_max)
        self.runs = PackBuilder(pack_size, block_size, runs=True)
        self.slots = threading.Semaphore(parallelism)
        self.cpu = threading.Semaphore(max(1, min(parallelism, usable_cpus())))
        self.lock = threading.Lock()
        self.entries: Dict[int, Tuple[str, int, Loc, str, bool]] = {}
        self.error: Optional[ScriptError] = None
        self.spent = {"read_s": 0.0, "hash_s": 0.0, "compress_s": 0.0, "upload_s": 0.0}
        self.bytes_uploaded = self.objects_uploaded = self.bytes_done = self.files = self.read = 0
        self._free: Dict[str, List[bytearray]] = {"block": [], "group": []}
        self._tar: Optional[subprocess.Popen] = None

    def timings(self) -> Dict[str, float]:
        return {k: round(v, 3) for k, v in self.spent.items()}

    def _add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.spent[stage] += seconds

    def _fail(self, err: ScriptError) -> None:
        with self.lock:
            if self.error is None:
                self.error = err
        if self._tar is not None and self._tar.poll() is None:
            self._tar.kill()  # unblocks the reader

    def _take(self, kind: str) -> bytearray:
        """A buffer for the next chunk, once a slot is free (the bound on memory)."""
        while not self.slots.acquire(timeout=0.2):
            if self.error is not None or self.ctx.cancelled.is_set():
                raise _Stop()
        with self.lock:
            free = self._free[kind]
            if free:
                return free.pop()
        return bytearray(self.block_size if kind == "block" else self.group_max)

    def run(self, make_tar: Callable[[int], List[str]]) -> Tuple[List[Tuple[str, int, Loc, str, bool]], int]:
        """Stream the whole archive; returns (chunk entries in stream order, file count)."""
        tar_run = TarCreate(self.ctx, make_tar)
        self._tar = tar = tar_run.proc
        chunker = Chunker(
            tar.stdout,
            self._take,
            block_size=self.block_size,
            large_min=self.large_min,
            group_max=self.group_max,
            modulus=self.modulus,
        )
        count = 0
        with ThreadPoolExecutor(self.parallelism, thread_name_prefix="chunk") as pool:
            it = iter(chunker)
            while True:
                t0 = time.monotonic()
                try:
                    item = next(it)
                except (_Stop, StopIteration):
                    break
                self._add("read_s", time.monotonic() - t0)
                kind, buf, n = item
                with self.lock:
                    self.read = count + 1
                pool.submit(self._chunk, count, kind, buf, n)
                count += 1
                if self.error is not None or self.ctx.cancelled.is_set():
                    break
            if self.error is not None or self.ctx.cancelled.is_set():
                tar.kill()
            rc = tar_run.finish()
        self.files = tar_run.files
        self.ctx.check()
        if self.error is not None:
            raise self.error
        if rc != 0:
            raise tar_run.failure(rc)
        for builder in (self.packer, self.runs):
            sealed = builder.flush()
            if sealed is not None:
                self._upload_pack(builder, sealed)
        return [self.entries[i] for i in range(count)], self.files

    def _chunk(self, i: int, kind: str, buf: bytearray, n: int) -> None:
        raw = memoryview(buf)[:n]
        try:
            t0 = time.monotonic()
            digest = hashlib.sha256(raw).hexdigest()
            self._add("hash_s", time.monotonic() - t0)
            loc, mine = self.index.claim(digest)
            if mine:
                try:
                    loc, mine = self._store(kind, digest, raw)
                finally:
                    self.index.settle(digest, loc)
            assert loc is not None
            with self.lock:
                self.entries[i] = (digest, n, loc, kind, mine)
                self.bytes_done += n
                done, read, bytes_done = len(self.entries), self.read, self.bytes_done
            total = self.total()
            self.ctx.events.progress(
                phase="upload",
                bytes_done=bytes_done,
                bytes_total=None if total is None else max(total, bytes_done),
                parts_done=done,
                parts_total=None if total is None else max(read, -(-total // self.block_size)),
            )
        except ScriptError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - any worker failure must stop the run, not vanish
            logger.exception("chunk %d failed", i)
            self._fail(ScriptError("internal", "chunk %d: %s: %s" % (i, type(exc).__name__, exc)))
        finally:
            raw.release()
            with self.lock:
                self._free[kind].append(buf)
            self.slots.release()

    def _store(self, kind: str, digest: str, raw: memoryview) -> Tuple[Loc, bool]:
        """Compress one new chunk and add it to a pack (a block: to a run; a group: to a group pack),
        uploading the pack it sealed; (location, True when this run stored it)."""
        if kind == "block":
            found = self.index.listed_block(digest, len(raw))  # stored by a crashed attempt
            if found is not None:
                return found, False
        t0 = time.monotonic()
        with self.cpu:
            codec_name, stored = encode_part(self.codec, raw)
        t1 = time.monotonic()
        sha = digest if stored is raw else hashlib.sha256(stored).hexdigest()
        t2 = time.monotonic()
        self._add("compress_s", t1 - t0)
        self._add("hash_s", t2 - t1)
        builder = self.packer if kind == "group" else self.runs
        loc, sealed = builder.add(digest, stored, len(raw), codec_name, sha)
        if sealed is not None:
            self._upload_pack(builder, sealed)
        return loc, True

    def _upload_pack(self, builder: PackBuilder, sealed: Sealed) -> None:
        key, view, buf, _, size, meta = sealed
        t0 = time.monotonic()
        try:
            self.put(key, view, meta)
        finally:
            builder.done(buf, view)
        self._add("upload_s", time.monotonic() - t0)
        with self.lock:
            self.bytes_uploaded += size
            self.objects_uploaded += 1


class _Stop(Exception):
    """The reader stops taking buffers: a worker failed or the run was cancelled."""
