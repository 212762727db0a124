"""Strict reading and clean writing of tar headers, for the restore member gate (gs_tarsafe).

Reading accepts only the header forms our snapshot writer (GNU tar `--format=posix`, the options
in snapshot.py) produces; anything else is ScriptError "unsafe_archive":

* every header: ustar magic `ustar\\0` version `00`, a valid (unsigned) checksum, numeric fields
  in GNU tar's exact octal layout (zero-padded digits and one NUL: no base-256, no blanks), name
  and link (and owner names) NUL-terminated with nothing but NULs after the terminator, zero
  device numbers, an empty `prefix`, zero padding;
* types `0` (file), `5` (directory), `2` (symlink), `1` (hard link), `6` (FIFO), and `x` (a pax
  header for the next member only, at most MAX_PAX_BYTES). Device types `3`/`4` are reported as
  such; `g`, `L`, `K`, `S`, `7`, `\\0`, `V`, `M`, `N`, `D`, ... are refused;
* pax records `path`, `linkpath`, `mtime`, `size`, `uid`, `gid` and the sparse-0.0 map
  (`GNU.sparse.size`, `GNU.sparse.numblocks`, then `GNU.sparse.offset`/`GNU.sparse.numbytes`
  pairs); each at most once (the pairs excepted), well-formed, no NUL in a value. `uname`,
  `gname`, `atime`, `ctime` (and the header's owner names) are read but never passed on: restore
  extracts with --numeric-owner and tar sets no atime; so is `hdrcharset=BINARY` (what tarfile
  writes for non-UTF-8 names: raw bytes, which is how the gate and tar under LC_ALL=C read names
  anyway). Any other keyword (`GNU.sparse.name`, `GNU.sparse.map`, `SCHILY.*`, ...) is refused.

Writing (encode) produces the few forms GNU tar reads one way only: a ustar header whose name and
link fit its fields, preceded by a pax header only for what does not fit. So whatever quirks a
hostile stream relies on, tar only ever sees headers the gate wrote from values it checked.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple
from zlib import adler32

from gs_common import ScriptError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_PAX_BYTES = 64 << 20  # a sparse-0.0 map of a very fragmented file fits; a hostile size does not
MEMBER_TYPES = (b"0", b"5", b"2", b"1", b"6")
DEVICE_TYPES = (b"3", b"4")
PAX_TYPE = b"x"

_DECIMAL = re.compile(rb"(?:0|[1-9][0-9]{0,18})\Z")
_MTIME = re.compile(rb"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,9})?\Z")
_MAX_ID = (1 << 32) - 1
_MAX_SIZE = (1 << 63) - 1
_PAX_SINGLE = (
    b"path",
    b"linkpath",
    b"mtime",
    b"size",
    b"uid",
    b"gid",
    b"GNU.sparse.size",
    b"GNU.sparse.numblocks",
    b"uname",
    b"gname",
    b"atime",
    b"ctime",
    b"hdrcharset",
)  # the last five: never passed on
_SPARSE_PAIR = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")


def unsafe(message: str) -> ScriptError:
    return ScriptError("unsafe_archive", message)


class Member:
    """One archive entry as the gate understands it (names are raw bytes, as on disk)."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "sparse")

    def __init__(
        self,
        name: bytes,
        type_: bytes,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime: bytes,
        linkname: bytes,
        sparse: Optional[Tuple[int, List[Tuple[int, int]]]] = None,
    ) -> None:
        self.name, self.type, self.mode, self.uid, self.gid = name, type_, mode, uid, gid
        self.size, self.mtime, self.linkname, self.sparse = size, mtime, linkname, sparse


def _small_sum(data: bytes) -> int:
    """sum(data) for len(data) <= 256, in C: Adler-32's low 16 bits are 1 + the byte sum modulo
    65521, exact while the sum stays below it (256 x 255 = 65280). The gate sums three or four header
    blocks per member; Python's sum() over bytes was a tenth of its time on a tree of small files."""
    return (adler32(data) & 0xFFFF) - 1


def _block_sum(block: bytes) -> int:
    """sum(block) of one 512-byte header block (two exact halves)."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _cstr(field: bytes, what: str) -> bytes:
    end = field.find(b"\0")
    if end < 0:
        return field
    if field.count(0, end) != len(field) - end:
        raise unsafe("%s field has bytes after its NUL terminator" % what)
    return field[:end]


# mode, uid, gid, size, mtime, checksum and type, exactly as GNU tar (and tarfile) write them:
# zero-padded octal with one NUL (the checksum: six digits, NUL, space). No base-256, no blanks.
_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 (.)", re.S)
# devmajor/devminor (all NUL in pax headers, zero in members), prefix (unused by GNU tar's POSIX
# format), padding
_TAILS = (bytes(183), b"0000000\x000000000\x00" + bytes(167))
_NO_OWNER_NAMES = bytes(64)  # uname + gname as --numeric-owner writes them
_NO_LINK = bytes(100)


def parse_header(block: bytes) -> Tuple[bytes, Dict[str, object]]:
    """(type, fields) of one 512-byte header; refuses every form our writer does not produce."""
    if block[257:265] != b"ustar\x0000":
        raise unsafe("header is not POSIX ustar (magic %r)" % block[257:265])
    numbers = _NUMBERS.match(block, 100)
    if numbers is None:
        raise unsafe("mode, uid, gid, size, mtime or checksum is not plain zero-padded octal")
    mode_s, uid_s, gid_s, size_s, mtime_s, checksum_s, kind = numbers.groups()
    if kind in DEVICE_TYPES:
        raise unsafe("device node %r is not allowed" % _cstr(block[0:100], "name"))
    if kind not in MEMBER_TYPES and kind != PAX_TYPE:
        raise unsafe("header type %r is not allowed" % kind)
    if block[329:512] not in _TAILS:
        raise unsafe("header has device numbers, a prefix or non-zero padding")
    # The checksum is the sum of the block's bytes with its own field (148:156) counted as 8 blanks.
    if int(checksum_s, 8) != _block_sum(block) - _small_sum(block[148:156]) + 256:
        raise unsafe("header checksum mismatch")
    mode = int(mode_s, 8)
    if mode > 0o7777:
        raise unsafe("mode %o has bits beyond 07777" % mode)
    if block[265:329] != _NO_OWNER_NAMES:  # owner names are never used (--numeric-owner) nor passed on
        _cstr(block[265:297], "uname")
        _cstr(block[297:329], "gname")
    return kind, {
        "name": _cstr(block[0:100], "name"),
        "linkname": b"" if block[157:257] == _NO_LINK else _cstr(block[157:257], "linkname"),
        "mode": mode,
        "uid": int(uid_s, 8),
        "gid": int(gid_s, 8),
        "size": int(size_s, 8),
        "mtime": int(mtime_s, 8),
    }


# The pax header GNU tar writes for nearly every member (`--pax-option=delete=atime,delete=ctime`):
# one mtime record. Read in one match; anything else takes the general path below.
_MTIME_ONLY = re.compile(rb"([1-9][0-9]?) mtime=([^\n\0]*)\n\Z")


def parse_pax(data: bytes) -> Dict[bytes, object]:
    """The records of one pax header, strictly (see the module docstring)."""
    one = _MTIME_ONLY.match(data) if len(data) < 100 else None
    if one is not None and int(one.group(1)) == len(data):
        return {b"mtime": one.group(2)}
    out: Dict[bytes, object] = {}
    pairs: List[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        space = data.find(b" ", pos, pos + 21)
        length_s = data[pos:space] if space > pos else b""
        if not _DECIMAL.match(length_s):
            raise unsafe("malformed pax record length at byte %d" % pos)
        end = pos + int(length_s)
        eq = data.find(b"=", space + 1, end)
        if end > n or end <= space + 1 or data[end - 1 : end] != b"\n" or eq < 0:
            raise unsafe("malformed pax record at byte %d" % pos)
        key, value = data[space + 1 : eq], data[eq + 1 : end - 1]
        if b"\0" in value:
            raise unsafe("pax record %r holds a NUL byte" % key)
        if key in _PAX_SINGLE:
            if key in out:
                raise unsafe("pax record %r repeated" % key)
            if key == b"hdrcharset" and value != b"BINARY":  # names are raw bytes here, as for tar in LC_ALL=C
                raise unsafe("pax hdrcharset %r is not BINARY" % value)
            out[key] = value
        elif key in _SPARSE_PAIR:
            if key != _SPARSE_PAIR[len(pairs) % 2]:
                raise unsafe("sparse map records out of order")
            pairs.append(value)
        else:
            raise unsafe("pax record %r is not one our snapshots write" % key)
        pos = end
    if pairs:
        out[b"pairs"] = pairs
    return out


def _pax_int(pax: Dict[bytes, object], key: bytes, default: int, limit: int) -> int:
    raw = pax.get(key)
    if raw is None:
        return default
    if not _DECIMAL.match(raw):  # type: ignore[arg-type]
        raise unsafe("pax %r value %r is not a decimal number" % (key, raw))
    value = int(raw)  # type: ignore[call-overload]
    if value > limit:
        raise unsafe("pax %r value %d is out of range" % (key, value))
    return value


def _sparse(pax: Dict[bytes, object], stored: int) -> Optional[Tuple[int, List[Tuple[int, int]]]]:
    has_map = b"GNU.sparse.size" in pax or b"GNU.sparse.numblocks" in pax or b"pairs" in pax
    if not has_map:
        return None
    real = _pax_int(pax, b"GNU.sparse.size", -1, _MAX_SIZE)
    count = _pax_int(pax, b"GNU.sparse.numblocks", -1, _MAX_SIZE)
    values = [int(v) if _DECIMAL.match(v) else -1 for v in pax.get(b"pairs", [])]  # type: ignore[attr-defined]
    if real < 0 or count < 0 or len(values) != 2 * count or min(values, default=0) < 0:
        raise unsafe("incomplete or malformed sparse map")
    chunks = list(zip(values[0::2], values[1::2]))
    at, total = 0, 0
    for offset, length in chunks:
        if offset < at or offset + length > real:
            raise unsafe("sparse map fragments overlap, go backwards or pass the file size")
        at, total = offset + length, total + length
    if total != stored:
        raise unsafe("sparse map covers %d bytes, the member stores %d" % (total, stored))
    return real, chunks


def make_member(kind: bytes, fields: Dict[str, object], pax: Dict[bytes, object]) -> Member:
    """Combine a member header with the pax records that precede it (pax values win, as in tar)."""
    name = pax.get(b"path", fields["name"])
    linkname = pax.get(b"linkpath", fields["linkname"])
    size = _pax_int(pax, b"size", fields["size"], _MAX_SIZE)  # type: ignore[arg-type]
    mtime = pax.get(b"mtime")
    if mtime is None:
        mtime = b"%d" % fields["mtime"]  # type: ignore[str-bytes-safe]
    elif not _MTIME.match(mtime):  # type: ignore[arg-type]
        raise unsafe("pax mtime %r is malformed" % mtime)
    sparse = _sparse(pax, size)
    if sparse is not None and kind != b"0":
        raise unsafe("sparse map on a member that is not a regular file")
    return Member(
        name,
        kind,
        fields["mode"],
        _pax_int(pax, b"uid", fields["uid"], _MAX_ID),  # type: ignore
        _pax_int(pax, b"gid", fields["gid"], _MAX_ID),  # type: ignore[arg-type]
        size,
        mtime,
        linkname,
        sparse,
    )  # type: ignore[arg-type]


# ---- writing -----------------------------------------------------------------------------------

_OCT7, _OCT11 = (1 << 21) - 1, (1 << 33) - 1
_TAIL = b"ustar\x0000" + bytes(64) + b"0000000\x000000000\x00" + bytes(167)  # magic..end, uname/gname empty
_TAIL_SUM = sum(_TAIL) + 256  # and the checksum field counted as 8 blanks


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, link: bytes) -> bytes:
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    # name, link <= 100 bytes, numbers 44: each piece sums exactly (_small_sum); NUL padding adds nothing
    checksum = _small_sum(name) + _small_sum(numbers) + kind[0] + _small_sum(link) + _TAIL_SUM
    return b"".join(
        (name, bytes(100 - len(name)), numbers, b"%06o\0 " % checksum, kind, link, bytes(100 - len(link)), _TAIL)
    )


_PAX_HEADERS: Dict[int, bytes] = {}  # the gate's pax header block for each small record length


def _pax_header(length: int) -> bytes:
    block = _PAX_HEADERS.get(length)
    if block is None:
        block = _ustar(b"././@PaxHeader", 0o644, 0, 0, length, 0, PAX_TYPE, b"")
        if length < BLOCK:  # a one-record header (an mtime): a few dozen lengths, kept
            _PAX_HEADERS[length] = block
    return block


def _record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n += 1
    return b"%d%s" % (n, body)


def encode(m: Member) -> bytes:
    """The header block(s) tar will read for `m`, data excluded."""
    records: List[bytes] = []
    if m.size > _OCT11:  # before the sparse size: GNU tar's `size` sets the file size too
        records.append(_record(b"size", b"%d" % m.size))
    if m.sparse is not None:
        real, chunks = m.sparse
        records.append(_record(b"GNU.sparse.size", b"%d" % real))
        records.append(_record(b"GNU.sparse.numblocks", b"%d" % len(chunks)))
        for offset, length in chunks:
            records.append(_record(b"GNU.sparse.offset", b"%d" % offset))
            records.append(_record(b"GNU.sparse.numbytes", b"%d" % length))
    name, link = m.name, m.linkname
    if len(name) > 99:
        records.append(_record(b"path", name))
        name = b"./@PaxPath"  # never used by tar; inert inside the root if it were
    if len(link) > 99:
        records.append(_record(b"linkpath", link))
        link = b""
    uid, gid = m.uid, m.gid
    if uid > _OCT7:
        records.append(_record(b"uid", b"%d" % uid))
        uid = 0
    if gid > _OCT7:
        records.append(_record(b"gid", b"%d" % gid))
        gid = 0
    whole = m.mtime.split(b".")[0]
    seconds = int(whole)
    if whole != m.mtime or not 0 <= seconds <= _OCT11:
        records.append(_record(b"mtime", m.mtime))
        seconds = min(max(seconds, 0), _OCT11)
    out = _ustar(name, m.mode, uid, gid, m.size if m.size <= _OCT11 else 0, seconds, m.type, link)
    if not records:
        return out
    data = b"".join(records)
    return b"".join((_pax_header(len(data)), data, bytes(-len(data) % BLOCK), out))


def encode_as_read(m: Member, block: bytes, pax_padded: Optional[bytes], mode_read: int) -> Optional[bytes]:
    """encode(m) without re-serialising, for the common member: the bytes read (the pax header's
    padded data `pax_padded` and the member's header `block`, both already parsed and checked) when
    they are byte for byte what encode(m) writes, else None (the caller encodes).

    That holds when the pax header held exactly the one `mtime` record encode() would write (it has
    a fraction, and its whole seconds are the header's mtime field), the member has no other pax
    value, the policy left its mode as read (`mode_read`), its name and link fit their fields, and
    the header's bytes from the magic on are encode()'s (empty owner names, zero device numbers):
    its numbers were read as exactly the zero-padded octal encode() writes and its checksum checked,
    so encode() would write the same block. On a tree of small files this is nearly every member,
    and re-serialising was a third of the gate's time."""
    if pax_padded is None or m.mode != mode_read or block[257:] != _TAIL:
        return None
    mtime = m.mtime
    whole, dot, _fraction = mtime.partition(b".")
    if not dot or len(m.name) > 99 or len(m.linkname) > 99 or int(whole) != int(block[136:147], 8):
        return None
    record = _record(b"mtime", mtime)
    if pax_padded[: len(record)] != record or pax_padded[len(record) :].count(0) != len(pax_padded) - len(record):
        return None  # more records than the mtime, or its length written otherwise
    return b"".join((_pax_header(len(record)), pax_padded, block))
