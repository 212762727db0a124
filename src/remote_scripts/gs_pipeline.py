"""The snapshot data path: tar stdout -> raw parts -> compress/hash -> upload, overlapped and bounded.

The reader (calling thread) takes a slot before it reads a part, and the worker that uploads the
part gives the slot back, so at most `parallelism` parts (raw + compressed copy) exist at any time
whatever the workspace size. Compression is further capped at one part per CPU.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from gs_codecs import Codec, encode_part
from gs_common import Context, ScriptError, TarCreate, read_full
from gs_manifest import part_key
from gs_s3 import S5, NotFound
from gs_tuning import usable_cpus

logger = logging.getLogger("gpusnap.remote")


class PartUploader:
    """Runs tar and turns its stream into uploaded parts. One instance per snapshot run."""

    def __init__(
        self,
        *,
        ctx: Context,
        s5: S5,
        codec: Codec,
        prefix: str,
        part_size: int,
        parallelism: int,
        existing: Dict[str, int],
        total: Callable[[], Optional[int]],
        put: Optional[Callable[[str, Any, Dict[str, str]], None]] = None,
    ) -> None:
        self.ctx, self.s5, self.codec, self.prefix = ctx, s5, codec, prefix
        self.put = put or s5.put  # a BatchUploader's put in production: one s5cmd for all parts
        self.part_size, self.parallelism = part_size, parallelism
        self.existing, self.total = existing, total  # estimated stream bytes; None while unknown
        self.slots = threading.Semaphore(parallelism)
        self.cpu = threading.Semaphore(max(1, min(parallelism, usable_cpus())))
        self.lock = threading.Lock()
        self.parts: Dict[int, Dict[str, Any]] = {}
        self.error: Optional[ScriptError] = None
        self.uploaded = self.skipped = self.parts_read = self.bytes_done = 0
        self.spent = {"read_s": 0.0, "hash_s": 0.0, "compress_s": 0.0, "upload_s": 0.0}
        self.files = 0
        self._tar: Optional[subprocess.Popen] = None
        # Part buffers are recycled: fresh 32 MiB allocations would be zero-filled and page-faulted
        # in for every part (measurable sys time on a 2-core host). Never more than `parallelism`.
        self._free: List[bytearray] = []

    def timings(self) -> Dict[str, float]:
        """Seconds spent per stage, summed over threads (they overlap, so they exceed wall time)."""
        return {k: round(v, 3) for k, v in self.spent.items()}

    def _fail(self, err: ScriptError) -> None:
        with self.lock:
            if self.error is None:
                self.error = err
        if self._tar is not None and self._tar.poll() is None:
            self._tar.kill()  # unblocks the reader

    def _add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.spent[stage] += seconds

    def run(self, make_tar: Callable[[int], List[str]]) -> Tuple[List[Dict[str, Any]], int]:
        """Stream the whole archive; returns (manifest part entries in order, file count)."""
        tar_run = TarCreate(self.ctx, make_tar)
        self._tar = tar = tar_run.proc
        with ThreadPoolExecutor(self.parallelism, thread_name_prefix="part") as pool:
            index = 0
            while True:
                if not self._take_slot():
                    break
                t0 = time.monotonic()
                with self.lock:
                    buf = self._free.pop() if self._free else bytearray(self.part_size)
                got = read_full(tar.stdout, buf)
                self._add("read_s", time.monotonic() - t0)
                if got == 0 or self.error is not None or self.ctx.cancelled.is_set():
                    self.slots.release()
                    break
                with self.lock:
                    self.parts_read = index + 1
                pool.submit(self._part, index, buf, got)
                index += 1
            rc = tar_run.finish()
        self.files = tar_run.files
        self.ctx.check()
        if self.error is not None:
            raise self.error
        if rc != 0:
            raise tar_run.failure(rc)
        return [self.parts[i] for i in range(index)], self.files

    def _take_slot(self) -> bool:
        while not self.slots.acquire(timeout=0.2):
            if self.error is not None or self.ctx.cancelled.is_set():
                return False
        return True

    def _part(self, index: int, buf: bytearray, size: int) -> None:
        raw = memoryview(buf)[:size]
        try:
            key = part_key(index)
            entry = self._store(key, index, raw)
            with self.lock:
                self.parts[index] = entry
                self.bytes_done += len(raw)
                done, read = len(self.parts), self.parts_read
                bytes_done = self.bytes_done
            total = self.total()
            self.ctx.events.progress(
                phase="upload",
                bytes_done=bytes_done,
                bytes_total=None if total is None else max(total, bytes_done),
                parts_done=done,
                parts_total=None if total is None else max(read, -(-total // self.part_size)),
            )
        except ScriptError as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - any worker failure must stop the run, not vanish
            logger.exception("part %d failed", index)
            self._fail(ScriptError("internal", "part %d: %s: %s" % (index, type(exc).__name__, exc)))
        finally:
            raw.release()
            with self.lock:
                self._free.append(buf)
            self.slots.release()

    def _store(self, key: str, index: int, raw: memoryview) -> Dict[str, Any]:
        """Compress and hash the part, then upload it unless an identical object is already there
        (a resumed run: compression is deterministic, so the same raw bytes give the same digest)."""
        t0 = time.monotonic()
        with self.cpu:
            codec_name, stored = encode_part(self.codec, raw)
        t1 = time.monotonic()
        sha = hashlib.sha256(stored).hexdigest()
        # The raw bytes need their own digest only when nothing else vouches for them on restore: a
        # raw part is its stored bytes, and zstd frames carry a checksum of their content.
        if stored is raw:
            raw_sha: Optional[str] = sha
        elif self.codec.checks_output(stored):
            raw_sha = None
        else:
            raw_sha = hashlib.sha256(raw).hexdigest()
        t2 = time.monotonic()
        self._add("compress_s", t1 - t0)
        self._add("hash_s", t2 - t1)
        entry = {
            "index": index,
            "key": key,
            "codec": codec_name,
            "raw_size": len(raw),
            "stored_size": len(stored),
            "sha256": sha,
            "raw_sha256": raw_sha,
        }
        if self._already_there(key, entry):
            with self.lock:
                self.skipped += 1
            return entry
        meta = {"sha256": sha, "raw-size": str(len(raw)), "stored-size": str(len(stored)), "codec": codec_name}
        if raw_sha is not None:
            meta["raw-sha256"] = raw_sha
        self.put(self.prefix + key, stored, meta)
        self._add("upload_s", time.monotonic() - t2)
        with self.lock:
            self.uploaded += 1
        return entry

    def _already_there(self, key: str, entry: Dict[str, Any]) -> bool:
        """True when the bucket holds this exact part already (same digest, sizes and codec)."""
        if self.existing.get(self.prefix + key) != entry["stored_size"]:
            return False  # absent, or of another size by the listing: no need to ask for its metadata
        try:
            info = self.s5.head(self.prefix + key)
        except NotFound:
            return False
        meta = info["metadata"]
        return (
            meta.get("sha256") == entry["sha256"]
            and info["size"] == entry["stored_size"]
            and meta.get("raw-size") == str(entry["raw_size"])
            and meta.get("codec") == entry["codec"]
        )
