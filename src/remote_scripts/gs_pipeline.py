"""The snapshot data path: tar stdout -> raw parts -> compress/hash -> upload, overlapped and bounded.

The reader (calling thread) takes a slot before it reads a part, and the worker that uploads the
part gives the slot back, so at most `parallelism` parts (raw + compressed copy) exist at any time
whatever the workspace size. Compression is further capped at one part per CPU.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

from gs_codecs import Codec, encode_part
from gs_common import Context, ScriptError, tail_text
from gs_manifest import part_key
from gs_s3 import S5, NotFound

logger = logging.getLogger("gpusnap.remote")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_F_SETPIPE_SZ = 1031


def read_full(stream: Any, buf: bytearray) -> int:
    """Fill `buf` from a raw pipe; returns the byte count (short only at end of stream)."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class PartUploader:
    """Runs tar and turns its stream into uploaded parts. One instance per snapshot run."""

    def __init__(self, *, ctx: Context, s5: S5, codec: Codec, prefix: str, part_size: int,
                 parallelism: int, existing: Dict[str, int], bytes_total: int) -> None:
        self.ctx, self.s5, self.codec, self.prefix = ctx, s5, codec, prefix
        self.part_size, self.parallelism = part_size, parallelism
        self.existing, self.bytes_total = existing, bytes_total
        self.slots = threading.Semaphore(parallelism)
        self.cpu = threading.Semaphore(max(1, min(parallelism, os.cpu_count() or 1)))
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
        index_r, index_w = os.pipe()
        try:
            self._tar = tar = self.ctx.spawn(make_tar(index_w), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, pass_fds=(index_w,), bufsize=0,
                                             env=dict(os.environ, LC_ALL="C"))
        except FileNotFoundError:
            raise ScriptError("missing_dependency", "GNU tar is not installed") from None
        finally:
            os.close(index_w)
        try:
            fcntl.fcntl(tar.stdout.fileno(), _F_SETPIPE_SZ, 1 << 20)  # fewer wakeups per part
        except OSError:
            pass
        counter = threading.Thread(target=self._count_members, args=(index_r,), daemon=True)
        errors: List[bytes] = []
        drain = threading.Thread(target=lambda: errors.append(tar.stderr.read()), daemon=True)
        counter.start()
        drain.start()
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
            rc = tar.wait()
        drain.join()
        counter.join(5)
        self.ctx.check()
        if self.error is not None:
            raise self.error
        if rc != 0:
            raise ScriptError("tar_failed", "tar exited %d: %s" % (rc, tail_text(b"".join(errors))))
        return [self.parts[i] for i in range(index)], self.files

    def _take_slot(self) -> bool:
        while not self.slots.acquire(timeout=0.2):
            if self.error is not None or self.ctx.cancelled.is_set():
                return False
        return True

    def _count_members(self, fd: int) -> None:
        # tar --verbose --index-file writes one (escaped) line per member; "./" is the root itself.
        count = 0
        with os.fdopen(fd, "rb") as index:
            for _line in index:
                count += 1
        self.files = max(0, count - 1)

    def _part(self, index: int, buf: bytearray, size: int) -> None:
        raw = memoryview(buf)[:size]
        try:
            key = part_key(index)
            t0 = time.monotonic()
            raw_sha = hashlib.sha256(raw).hexdigest()
            self._add("hash_s", time.monotonic() - t0)
            entry = self._reusable(key, index, raw, raw_sha)
            if entry is None:
                entry = self._upload(key, index, raw, raw_sha)
                with self.lock:
                    self.uploaded += 1
            else:
                with self.lock:
                    self.skipped += 1
            with self.lock:
                self.parts[index] = entry
                self.bytes_done += len(raw)
                done, read = len(self.parts), self.parts_read
                bytes_done = self.bytes_done
            self.ctx.events.progress(phase="upload", bytes_done=bytes_done,
                                     bytes_total=max(self.bytes_total, bytes_done), parts_done=done,
                                     parts_total=max(read, -(-self.bytes_total // self.part_size)))
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

    def _reusable(self, key: str, index: int, raw: memoryview, raw_sha: str) -> Optional[Dict[str, Any]]:
        """The manifest entry of an identical part already in the bucket (resume), else None."""
        if self.prefix + key not in self.existing:
            return None
        try:
            info = self.s5.head(self.prefix + key)
        except NotFound:
            return None
        meta = info["metadata"]
        same = (meta.get("raw-sha256") == raw_sha and meta.get("raw-size") == str(len(raw))
                and meta.get("stored-size") == str(info["size"]) and meta.get("codec") in ("zstd", "nvcomp-ans", "none")
                and _HEX64.match(str(meta.get("sha256", ""))))
        if not same:
            return None
        return {"index": index, "key": key, "codec": meta["codec"], "raw_size": len(raw),
                "stored_size": info["size"], "sha256": meta["sha256"], "raw_sha256": raw_sha}

    def _upload(self, key: str, index: int, raw: memoryview, raw_sha: str) -> Dict[str, Any]:
        t0 = time.monotonic()
        with self.cpu:
            codec_name, stored = encode_part(self.codec, raw)
        t1 = time.monotonic()
        sha = raw_sha if stored is raw else hashlib.sha256(stored).hexdigest()
        t2 = time.monotonic()
        self.s5.put(self.prefix + key, stored, {"sha256": sha, "raw-sha256": raw_sha, "raw-size": str(len(raw)),
                                                "stored-size": str(len(stored)), "codec": codec_name})
        self._add("compress_s", t1 - t0)
        self._add("hash_s", t2 - t1)
        self._add("upload_s", time.monotonic() - t2)
        return {"index": index, "key": key, "codec": codec_name, "raw_size": len(raw),
                "stored_size": len(stored), "sha256": sha, "raw_sha256": raw_sha}
