"""Pack objects of snapshot format 2: many small stored chunks in one object, with a table of contents.

Layout (docs/data-plane.md, "Format 2"): the chunks' stored bytes back to back, then the TOC as UTF-8
JSON, then a 16-byte footer: the TOC's length as 8 bytes big-endian and b"GSPACK01".
TOC: {"format": "gpusnap-pack", "version": 1, "chunks": [[raw_sha256, offset, stored_size, raw_size,
codec, sha256_of_stored], ...]}. The object is named by the SHA-256 of all its bytes
(`packs/<hex>`), so a name never holds two different contents.

Packs exist so that a workspace of 100,000 small files is a few hundred objects, not 100,000: every
object costs a request to write, list, verify and delete. The 16 MiB blocks of large files are stored
in packs too ("runs": up to `pack_size` bytes, at most RUN_BLOCKS blocks, never a group), so a restore
makes one GET and one s5cmd process per ~32 MiB, as format 1 does, not one per block (measured:
docs/benchmarks.md). A run's object metadata `blocks` names its blocks' raw digests, so that a
resumed run finds a crashed attempt's blocks with a HEAD instead of downloading every orphan.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple

from gs_codecs import PART_CODECS
from gs_common import ScriptError

MAGIC = b"GSPACK01"
FOOTER = 16
PACK_FORMAT = "gpusnap-pack"
DEFAULT_PACK_SIZE = 32 << 20
RUN_BLOCKS = 16  # blocks per run object at most: their digests (65 bytes each) fit S3's 2 KiB of metadata
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def seal(data: bytearray, length: int, toc: List[List[Any]]) -> Tuple[memoryview, str]:
    """Append TOC and footer to the `length` stored bytes in `data`; (object view, SHA-256 hex)."""
    body = json.dumps({"format": PACK_FORMAT, "version": 1, "chunks": toc}, separators=(",", ":")).encode()
    tail = body + struct.pack(">Q", len(body)) + MAGIC
    data[length : length + len(tail)] = tail  # grows the buffer only when the TOC does not fit
    view = memoryview(data)[: length + len(tail)]
    return view, hashlib.sha256(view).hexdigest()


def parse_toc(obj: Any) -> List[Dict[str, Any]]:
    """The chunk entries of a whole pack object, checked against its size; ScriptError part_corrupt."""
    view = memoryview(obj)
    if len(view) < FOOTER or bytes(view[-8:]) != MAGIC:
        raise ScriptError("part_corrupt", "pack object has no GSPACK01 footer")
    (toc_len,) = struct.unpack(">Q", bytes(view[-FOOTER:-8]))
    data_end = len(view) - FOOTER - toc_len
    if toc_len > len(view) - FOOTER:
        raise ScriptError("part_corrupt", "pack TOC length %d exceeds the object" % toc_len)
    try:
        toc = json.loads(bytes(view[data_end : len(view) - FOOTER]).decode("utf-8"))
        rows = toc["chunks"] if toc.get("format") == PACK_FORMAT and toc.get("version") == 1 else None
    except (ValueError, AttributeError, KeyError, TypeError):
        rows = None
    if not isinstance(rows, list):
        raise ScriptError("part_corrupt", "pack TOC is not a gpusnap-pack v1 table")
    out = []
    for row in rows:
        ok = (
            isinstance(row, list)
            and len(row) == 6
            and isinstance(row[0], str)
            and _HEX64.match(row[0])
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:4])
            and row[4] in PART_CODECS
            and isinstance(row[5], str)
            and _HEX64.match(row[5])
            and row[1] + row[2] <= data_end
        )
        if not ok:
            raise ScriptError("part_corrupt", "pack TOC row %r is malformed" % (row,))
        out.append(
            {
                "raw_sha256": row[0],
                "offset": row[1],
                "stored_size": row[2],
                "raw_size": row[3],
                "codec": row[4],
                "sha256": row[5],
            }
        )
    return out


class Loc:
    """Where one chunk's stored bytes are: object key (relative to the machine prefix), offset, sizes,
    codec, digests. A chunk added to a pack being filled gets its key when the pack is sealed."""

    __slots__ = ("key", "offset", "stored_size", "raw_size", "codec", "sha256", "object_size", "object_sha256")

    def __init__(
        self,
        key: Optional[str],
        offset: int,
        stored_size: int,
        raw_size: int,
        codec: str,
        sha256: str,
        object_size: int = 0,
        object_sha256: str = "",
    ) -> None:
        self.key, self.offset, self.stored_size, self.raw_size = key, offset, stored_size, raw_size
        self.codec, self.sha256, self.object_size, self.object_sha256 = codec, sha256, object_size, object_sha256


# A sealed pack: (key, object bytes, its buffer, the Locs it holds, size, object metadata).
Sealed = Tuple[str, memoryview, bytearray, List[Loc], int, Dict[str, str]]


class PackBuilder:
    """Collects stored chunks into packs of about `pack_size` bytes; thread-safe.

    add() copies a chunk into the open pack and returns its Loc plus, when that filled the pack, the
    sealed pack to upload (the caller uploads it outside the lock, then calls done()). Buffers are
    recycled: at most `open + uploading` packs exist at any time. Group packs are sealed once they
    reach `pack_size`; runs of blocks (`runs=True`) before a block would take them past it (two
    incompressible 16 MiB blocks fill a 32 MiB run exactly) or past RUN_BLOCKS blocks."""

    def __init__(self, pack_size: int, chunk_max: int, runs: bool = False) -> None:
        self.pack_size, self.chunk_max, self.runs = pack_size, chunk_max, runs
        self.lock = threading.Lock()
        self._free: List[bytearray] = []
        self._buf: Optional[bytearray] = None
        self._len = 0
        self._toc: List[List[Any]] = []
        self._locs: List[Loc] = []

    def add(self, raw_sha: str, stored: Any, raw_size: int, codec: str, sha: str) -> Tuple[Loc, Optional[Sealed]]:
        n = len(stored)
        with self.lock:
            sealed = None
            if self.runs and self._toc and (self._len + n > self.pack_size or len(self._toc) >= RUN_BLOCKS):
                sealed = self._seal_locked()
            if self._buf is None:
                size = max(self.pack_size, n) + 4096 if self.runs else self.pack_size + self.chunk_max
                self._buf = self._free.pop() if self._free else bytearray(size)
                self._len, self._toc, self._locs = 0, [], []
            off = self._len
            self._buf[off : off + n] = stored
            self._len += n
            loc = Loc(None, off, n, raw_size, codec, sha)
            self._toc.append([raw_sha, off, n, raw_size, codec, sha])
            self._locs.append(loc)
            if sealed is not None or self._len < self.pack_size:
                return loc, sealed
            return loc, self._seal_locked()

    def flush(self) -> Optional[Sealed]:
        """The open pack, sealed (None when it is empty): call after the last add()."""
        with self.lock:
            return self._seal_locked() if self._buf is not None and self._toc else None

    def _seal_locked(self) -> Sealed:
        buf, length, toc, locs = self._buf, self._len, self._toc, self._locs
        self._buf, self._len, self._toc, self._locs = None, 0, [], []
        assert buf is not None
        view, digest = seal(buf, length, toc)
        key = "packs/" + digest
        for loc in locs:
            loc.key, loc.object_size, loc.object_sha256 = key, len(view), digest
        meta = {"sha256": digest, "chunks": str(len(locs))}
        if self.runs:
            meta["blocks"] = ",".join(row[0] for row in toc)
        return key, view, buf, locs, len(view), meta

    def done(self, buf: bytearray, view: memoryview) -> None:
        """The sealed pack is uploaded: its buffer can hold the next one."""
        view.release()
        with self.lock:
            if len(self._free) < 2:
                self._free.append(buf)
