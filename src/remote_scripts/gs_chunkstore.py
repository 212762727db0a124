"""The machine's chunk store as one snapshot run sees it (format 2): which chunks can be referenced
instead of stored again, and where they are.

Three sources, checked in this order for each chunk digest:
1. `known_chunks` from the control plane (its database: chunks of complete snapshots of this machine),
   kept only when the start-of-run listing shows their object with the recorded size;
2. chunks stored earlier in this run (a repeated file, zero blocks of a preallocated file);
3. what a crashed or cancelled earlier attempt left (resume). Listed packs that no known chunk points
   to are HEADed (at most RESUME_HEADS of them, in parallel): a run (its metadata names its blocks) is
   fetched only when this run needs one of those blocks, its TOC read and every row checked; other
   packs (groups) are fetched at the start and their TOC read (at most RESUME_PACKS of them). A chunk
   is reused only when its stored bytes decode to the digest its TOC row names. A block that an older
   writer stored as its own object `chunks/<raw>` is reused after a HEAD shows matching metadata and
   its bytes, fetched, decode to the digest. Nothing an unreferenced object
   says about itself is trusted: anyone with write on the machine prefix (a previous host of the
   machine) can plant one, and a restore would fail on it only after hibernate destroyed the host.

A digest being stored by one worker is "in flight": another worker that needs it waits for it rather
than storing it twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from gs_codecs import PART_CODECS, Codec, for_restore
from gs_common import ScriptError
from gs_packer import RUN_BLOCKS, Loc, parse_toc
from gs_s3 import S5, NotFound

logger = logging.getLogger("gpusnap.remote")

KEY_RE = re.compile(r"^(chunks|packs)/[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
RESUME_PACKS = 64  # a crashed run leaves few group packs (small files only); never download more than this
RESUME_HEADS = 4096  # orphan packs looked at (a HEAD each): a crashed attempt of 128 GiB of runs at most


def parse_known(rows: Any) -> Dict[str, Loc]:
    """config `known_chunks` -> {raw_sha256: Loc}; bad_config on a malformed row."""
    if not isinstance(rows, list):
        raise ScriptError("bad_config", "known_chunks must be a list")
    out: Dict[str, Loc] = {}
    for row in rows:
        ok = (
            isinstance(row, list)
            and len(row) == 9
            and isinstance(row[0], str)
            and _HEX64.match(row[0])
            and isinstance(row[1], str)
            and KEY_RE.match(row[1])
            and row[5] in PART_CODECS
            and all(isinstance(row[i], int) and not isinstance(row[i], bool) and row[i] >= 0 for i in (2, 3, 4, 7))
            and isinstance(row[6], str)
            and _HEX64.match(row[6])
            and isinstance(row[8], str)
            and _HEX64.match(row[8])
            and row[2] + row[3] <= row[7]
        )
        if not ok:
            raise ScriptError("bad_config", "known_chunks row %r is malformed" % (row,))
        out[row[0]] = Loc(row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8])
    return out


MAX_RAW_DEFAULT = 256 << 20  # gs_manifest.MAX_CHUNK_BYTES


class ChunkIndex:
    """Thread-safe lookup and claim of chunk digests for one run."""

    def __init__(self, s5: S5, store_prefix: str, known: Dict[str, Loc], max_raw: int = MAX_RAW_DEFAULT) -> None:
        self.s5, self.prefix = s5, store_prefix
        self.max_raw = max_raw  # no chunk this run writes is larger: a bigger claim is not ours
        self.lock = threading.Lock()
        self.listing: Dict[str, int] = {}
        for folder in ("chunks/", "packs/"):
            for key, size in s5.list(store_prefix + folder).items():
                self.listing[key[len(store_prefix) :]] = size
        self.known = {raw: loc for raw, loc in known.items() if self.listing.get(loc.key) == loc.object_size}
        self.dropped = len(known) - len(self.known)  # told, but not (or not so) in the bucket
        self.stored: Dict[str, Loc] = {}  # stored by this run, or found from an earlier attempt
        self.inflight: Dict[str, threading.Event] = {}
        self.resumed_chunks = 0
        self.packs_read = 0
        self.runs: Dict[str, str] = {}  # raw digest -> orphan run that says it holds it (unverified)
        self._run_rows: Dict[str, Dict[str, Loc]] = {}  # run key -> its verified rows, once fetched
        self._run_locks: Dict[str, threading.Lock] = {}
        self.failed = False
        self._decoders: Dict[str, Optional[Codec]] = {}

    def decodes_to(self, codec: str, stored: Any, raw_sha256: str, raw_size: int) -> bool:
        """Whether stored bytes left by an earlier attempt decode to the chunk they claim to be. A
        decoder allocates the claimed size first, so a claim larger than any chunk of this run (a
        planted pack's TOC saying 1 TiB) is refused before it is decoded, never allocated."""
        if raw_size > self.max_raw:
            return False
        with self.lock:
            if codec not in self._decoders:
                try:
                    self._decoders[codec] = for_restore([codec], bootstrap=False)[codec]
                except ScriptError:
                    self._decoders[codec] = None  # cannot check here: store the chunk again
            decoder = self._decoders[codec]
        if decoder is None:
            return False
        try:
            raw = stored if codec == "none" else decoder.decompress(stored, raw_size)
        except (ScriptError, MemoryError):
            return False
        return len(raw) == raw_size and hashlib.sha256(raw).hexdigest() == raw_sha256

    def resume_packs(self, max_size: int, workers: int) -> int:
        """Look at the listed packs no known chunk points to (left by an earlier attempt): remember
        which blocks each run says it holds, read the TOC of the others now. A listed pack over
        `max_size` (more than this run's packs can be) is not one of ours: never buffered. Returns
        the number of orphan packs looked at."""
        referenced = {loc.key for loc in self.known.values()}
        orphans = sorted(
            k for k in self.listing if k.startswith("packs/") and k not in referenced and self.listing[k] <= max_size
        )[:RESUME_HEADS]
        if not orphans:
            return 0
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="head") as pool:
            heads = list(pool.map(self._head, orphans))
        groups = []
        for key, blocks in zip(orphans, heads):
            if blocks is None:
                groups.append(key)
            for raw in blocks or ():
                self.runs.setdefault(raw, key)
                self._run_locks.setdefault(key, threading.Lock())
        for key in groups[:RESUME_PACKS]:
            for row in self._read_pack(key):
                self.stored.setdefault(row[0], row[1])
                self.resumed_chunks += 1
        return len(orphans)

    def _head(self, key: str) -> Optional[List[str]]:
        """The block digests an orphan run's metadata names; None for a group pack (or a run whose
        metadata is malformed: its TOC is read at the start instead)."""
        try:
            meta = self.s5.head(self.prefix + key)["metadata"]
        except NotFound:
            return []  # removed since the listing (gc of an old attempt): nothing to reuse
        blocks = meta.get("blocks", "").split(",")
        if "blocks" not in meta or len(blocks) > RUN_BLOCKS or not all(_HEX64.match(b) for b in blocks):
            return None
        return blocks

    def _read_pack(self, key: str) -> List[Tuple[str, Loc]]:
        """The rows of an orphan pack whose stored bytes decode to the digest the row names."""
        size = self.listing[key]
        try:
            body = self.s5.cat(self.prefix + key, size, "upload_failed")
        except NotFound:
            return []  # removed since the listing (gc of an old attempt): nothing to reuse
        with self.lock:
            self.packs_read += 1
        digest = hashlib.sha256(body).hexdigest()
        if len(body) != size or "packs/" + digest != key:
            logger.warning("pack %s does not match its name; not reused", key)
            return []
        try:
            rows = parse_toc(body)
        except ScriptError as exc:
            logger.warning("pack %s: %s; not reused", key, exc.message)
            return []
        out = []
        for row in rows:
            stored = memoryview(body)[row["offset"] : row["offset"] + row["stored_size"]]
            if hashlib.sha256(stored).hexdigest() != row["sha256"] or not self.decodes_to(
                row["codec"], stored, row["raw_sha256"], row["raw_size"]
            ):
                logger.warning(
                    "pack %s: chunk %s... does not hold what its TOC says; not reused", key, row["raw_sha256"][:12]
                )
                continue
            loc = Loc(
                key, row["offset"], row["stored_size"], row["raw_size"], row["codec"], row["sha256"], size, digest
            )
            out.append((row["raw_sha256"], loc))
        return out

    def claim(self, raw: str) -> Tuple[Optional[Loc], bool]:
        """(location, False) when the chunk is already stored; (None, True) when the caller must store
        it and then call settle(); waits while another worker is storing it."""
        while True:
            with self.lock:
                loc = self.known.get(raw) or self.stored.get(raw)
                if loc is not None:
                    return loc, False
                event = self.inflight.get(raw)
                if event is None:
                    self.inflight[raw] = threading.Event()
                    return None, True
            event.wait()
            if self.failed:
                raise ScriptError("internal", "a worker storing a shared chunk failed")

    def settle(self, raw: str, loc: Optional[Loc]) -> None:
        """The claimed chunk is stored at `loc` (None: storing failed; waiters give up)."""
        with self.lock:
            if loc is not None:
                self.stored[raw] = loc
            else:
                self.failed = True
            event = self.inflight.pop(raw)
        event.set()

    def listed_block(self, raw: str, raw_size: int) -> Optional[Loc]:
        """A block an earlier attempt stored: in a run whose metadata names it (the run is fetched
        once and every row checked), or as chunks/<raw> (older writers) when its metadata vouches."""
        run = self.runs.get(raw)
        if run is not None:
            with self._run_locks[run]:
                rows = self._run_rows.get(run)
                if rows is None:
                    rows = self._run_rows[run] = dict(self._read_pack(run))
            loc = rows.get(raw)
            if loc is not None and loc.raw_size == raw_size:
                with self.lock:
                    self.resumed_chunks += 1
                return loc
        key = "chunks/" + raw
        size = self.listing.get(key)
        if size is None or size > raw_size:  # a stored block is never larger than its raw bytes
            return None  # (gs_codecs.encode_part): no bigger one is fetched
        try:
            info = self.s5.head(self.prefix + key)
        except NotFound:
            return None
        meta = info["metadata"]
        sha, codec = meta.get("sha256", ""), meta.get("codec", "")
        if (
            info["size"] != size
            or meta.get("raw-sha256") != raw
            or meta.get("raw-size") != str(raw_size)
            or meta.get("stored-size") != str(size)
            or codec not in PART_CODECS
            or not _HEX64.match(sha)
        ):
            return None
        try:  # the metadata is the object's own word: check the bytes (resume only, so rare)
            body = self.s5.cat(self.prefix + key, size, "upload_failed")
        except NotFound:
            return None
        if (
            len(body) != size
            or hashlib.sha256(body).hexdigest() != sha
            or not self.decodes_to(codec, body, raw, raw_size)
        ):
            logger.warning("block %s does not hold what its metadata says; stored again", key)
            return None
        with self.lock:
            self.resumed_chunks += 1
        return Loc(key, 0, size, raw_size, codec, sha, size, sha)

    def check_present(self, locs: List[Loc]) -> None:
        """After the upload: every object the manifest will reference is in the bucket at its size."""
        listing: Dict[str, int] = {}
        for folder in ("chunks/", "packs/"):
            for key, size in self.s5.list(self.prefix + folder).items():
                listing[key[len(self.prefix) :]] = size
        for loc in locs:
            if listing.get(loc.key or "") != loc.object_size:
                got = listing.get(loc.key or "")
                raise ScriptError(
                    "upload_failed",
                    "object %s is %s in the bucket, expected %d bytes"
                    % (loc.key, "missing" if got is None else "%d bytes" % got, loc.object_size),
                )
