"""Cut the tar stream GNU tar writes into content-defined-by-structure chunks (snapshot format 2).

The stream is parsed header by header (only the headers: member data is never looked at), and cut so
that an unchanged file gives the same chunks next time (docs/data-plane.md, "Format 2"):

* a member with at least `large_min` bytes of data: its header blocks go to the current group, the
  group is cut, and its data region (with the padding to 512 bytes) is cut into `block_size` blocks
  aligned to the start of the data, so an append changes only the last block;
* everything else (headers, directories, links, small files' headers and data, the end-of-archive
  zero blocks) accumulates in a group, cut after an entry whose path hash hits a fixed residue
  (sha1(path)[:8] % group_modulus == 0), when it reaches `group_max`, and at the end. A touched mtime
  then changes one small group and the cut points after it stay where they were.

INVARIANT: the concatenation of the chunks, in order, is exactly the stream read. Parsing only
chooses cut points; every byte read goes into exactly one chunk, whatever the stream holds, so a
stream this parser does not understand still round-trips (only the cut points get worse).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, List, Optional, Tuple

BLOCK = 512
DEFAULT_BLOCK_SIZE = 16 << 20
LARGE_MIN = 256 << 10
GROUP_MAX = 4 << 20
GROUP_MODULUS = 64
READ_SIZE = 1 << 20
# Header types whose size field does not announce data that follows (as tarfile and GNU tar read them).
_NO_DATA = frozenset(b"123456")
_PAX_TYPES = frozenset(b"xgXLK")  # header blocks that describe the next member (pax, GNU long names)


def _octal(field: bytes) -> int:
    """A numeric header field: octal digits, or GNU base-256 (leading 0x80 byte)."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return 0  # not a header we understand: treat as data-less, the bytes still round-trip


def _pax_fields(data: bytes) -> Tuple[Optional[int], Optional[bytes]]:
    """(size, path) records of a pax header, when present; malformed records are ignored."""
    size: Optional[int] = None
    path: Optional[bytes] = None
    pos, n = 0, len(data)
    while pos < n:
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            break
        try:
            end = pos + int(data[pos:space])
        except ValueError:
            break
        if end <= space or end > n:
            break
        record = data[space + 1 : end - 1]
        key, _, value = record.partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                pass
        elif key == b"path":
            path = value
        pos = end
    return size, path


def cut_here(path: bytes, modulus: int) -> bool:
    """The entry named `path` ends a group (a fixed residue of its name's hash)."""
    return int.from_bytes(hashlib.sha1(path).digest()[:8], "big") % modulus == 0


class Chunker:
    """Iterates (kind, buffer, length) over the stream of `source` (anything with readinto).

    `take(kind)` supplies the writable buffer for the next chunk ("block": block_size bytes, "group":
    group_max + READ_SIZE bytes at least); the consumer owns it once yielded and recycles it. Blocks
    are read straight from the source into their buffer (no copy); group bytes are copied once from
    the read buffer."""

    def __init__(
        self,
        source: Any,
        take: Callable[[str], bytearray],
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        large_min: int = LARGE_MIN,
        group_max: int = GROUP_MAX,
        modulus: int = GROUP_MODULUS,
    ) -> None:
        self.source, self.take = source, take
        self.block_size, self.large_min, self.group_max, self.modulus = block_size, large_min, group_max, modulus
        self.rbuf = bytearray(READ_SIZE)
        self.rview = memoryview(self.rbuf)
        self.pos = self.end = 0
        self.eof = False
        self.group: Optional[bytearray] = None
        self.glen = 0
        self.members = 0
        self.bytes = 0

    # ---- reading -------------------------------------------------------------------------------
    def _fill(self, need: int) -> int:
        """Make up to `need` bytes available at pos (less only at the end of the stream)."""
        avail = self.end - self.pos
        if avail >= need or self.eof:
            return avail
        if self.pos:
            self.rbuf[:avail] = self.rview[self.pos : self.end]
            self.pos, self.end = 0, avail
        while self.end - self.pos < need and self.end < len(self.rbuf):
            n = self.source.readinto(self.rview[self.end :])
            if not n:
                self.eof = True
                break
            self.end += n
        return self.end - self.pos

    # ---- groups --------------------------------------------------------------------------------
    def _group_copy(self, n: int) -> Iterator[Tuple[str, bytearray, int]]:
        """Move n stream bytes into the current group (cut at group_max if one entry is that big)."""
        while n > 0:
            avail = self._fill(min(n, READ_SIZE))
            if avail == 0:
                return
            if self.group is None:
                self.group, self.glen = self.take("group"), 0
            step = min(n, avail, self.group_max - self.glen) if self.glen < self.group_max else 0
            if step == 0:
                yield from self._cut()
                continue
            self.group[self.glen : self.glen + step] = self.rview[self.pos : self.pos + step]
            self.glen += step
            self.pos += step
            n -= step

    def _cut(self) -> Iterator[Tuple[str, bytearray, int]]:
        if self.group is not None and self.glen:
            buf, n = self.group, self.glen
            self.group, self.glen = None, 0
            self.bytes += n
            yield "group", buf, n

    # ---- blocks --------------------------------------------------------------------------------
    def _blocks(self, n: int) -> Iterator[Tuple[str, bytearray, int]]:
        """The next n stream bytes as block chunks of block_size (the last one shorter)."""
        while n > 0:
            want = min(n, self.block_size)
            buf = self.take("block")
            view = memoryview(buf)
            got = min(want, self.end - self.pos)
            view[:got] = self.rview[self.pos : self.pos + got]
            self.pos += got
            while got < want:
                r = self.source.readinto(view[got:want])
                if not r:
                    self.eof = True
                    break
                got += r
            view.release()
            if got:
                self.bytes += got
                yield "block", buf, got
            if got < want:
                return
            n -= got

    # ---- the walk ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[str, bytearray, int]]:
        path: Optional[bytes] = None
        size_override: Optional[int] = None
        while True:
            if self._fill(BLOCK) < BLOCK:
                break  # a truncated stream: whatever is left goes to the group below
            header = bytes(self.rview[self.pos : self.pos + BLOCK])
            if header == bytes(BLOCK):
                break  # end of archive: the zero blocks and the record padding follow
            kind = header[156]
            size = _octal(header[124:136])
            if kind in _PAX_TYPES:
                data_len = -(-size // BLOCK) * BLOCK
                if self._fill(BLOCK + size) >= BLOCK + size and kind in b"xX":
                    pax_size, pax_path = _pax_fields(bytes(self.rview[self.pos + BLOCK : self.pos + BLOCK + size]))
                    size_override = pax_size if pax_size is not None else size_override
                    path = pax_path if pax_path is not None else path
                elif kind == ord("L") and self._fill(BLOCK + size) >= BLOCK + size:
                    path = bytes(self.rview[self.pos + BLOCK : self.pos + BLOCK + size]).split(b"\0", 1)[0]
                yield from self._group_copy(BLOCK + data_len)
                continue
            self.members += 1
            if size_override is not None:
                size = size_override
            if kind in _NO_DATA:
                size = 0
            name = path if path is not None else header[:100].split(b"\0", 1)[0]
            path, size_override = None, None
            data_len = -(-size // BLOCK) * BLOCK
            if size >= self.large_min:
                yield from self._group_copy(BLOCK)
                yield from self._cut()
                yield from self._blocks(data_len)
            else:
                yield from self._group_copy(BLOCK + data_len)
            if self.glen >= self.group_max or (self.glen and cut_here(name, self.modulus)):
                yield from self._cut()
        # the rest of the stream: end-of-archive blocks, record padding, or anything not understood
        while self._fill(READ_SIZE):
            yield from self._group_copy(self.end - self.pos)
        yield from self._cut()


def chunk_bytes(data: bytes, **kwargs: Any) -> List[bytes]:
    """The chunks of an in-memory stream (tests and tools)."""
    import io

    out: List[bytes] = []

    def take(kind: str) -> bytearray:
        return bytearray(
            kwargs.get("block_size", DEFAULT_BLOCK_SIZE)
            if kind == "block"
            else kwargs.get("group_max", GROUP_MAX) + READ_SIZE
        )

    for _kind, buf, n in Chunker(io.BytesIO(data), take, **kwargs):
        out.append(bytes(buf[:n]))
    return out
