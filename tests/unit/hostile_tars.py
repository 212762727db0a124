"""Raw tar bytes, written block by block, for the hostile-archive corpus of the restore gate.

tarfile refuses to write most of these forms (GNU magic with a prefix, base-256 in a POSIX header,
a `g` header with a size, NULs inside names...), so headers are built field by field here; every
field can be overridden with raw bytes, the checksum too.
"""

from __future__ import annotations

from collections.abc import Iterable

BLOCK = 512
END = bytes(2 * BLOCK)
USTAR = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"

# (offset, length) of each header field (POSIX ustar; GNU shares the layout up to `prefix`)
FIELDS: dict[str, tuple[int, int]] = {
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "gid": (116, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "chksum": (148, 8),
    "type": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "uname": (265, 32),
    "gname": (297, 32),
    "devmajor": (329, 8),
    "devminor": (337, 8),
    "prefix": (345, 155),
    "pad": (500, 12),
}


def octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def header(
    name: bytes | str = b"./f",
    *,
    type_: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 981173106,
    linkname: bytes | str = b"",
    magic: bytes = USTAR,
    chksum: bytes | None = None,
    raw: dict[str, bytes] | None = None,
) -> bytes:
    """One 512-byte header; `raw` replaces any field (by FIELDS name) with exact bytes."""
    fields = {
        "name": name.encode() if isinstance(name, str) else name,
        "mode": octal(mode, 8),
        "uid": octal(uid, 8),
        "gid": octal(gid, 8),
        "size": octal(size, 12),
        "mtime": octal(mtime, 12),
        "type": type_,
        "linkname": linkname.encode() if isinstance(linkname, str) else linkname,
        "magic": magic,
        "devmajor": octal(0, 8),
        "devminor": octal(0, 8),
    }
    fields.update(raw or {})
    block = bytearray(BLOCK)
    for key, value in fields.items():
        off, length = FIELDS[key]
        assert len(value) <= length, (key, value)
        block[off : off + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = chksum if chksum is not None else b"%06o\x00 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def record(key: bytes | str, value: bytes | str) -> bytes:
    """One well-formed pax record `LEN key=value\\n`."""
    k = key.encode() if isinstance(key, str) else key
    v = value.encode() if isinstance(value, str) else value
    body = b" %s=%s\n" % (k, v)
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n += 1
    return b"%d%s" % (n, body)


def pax(
    records: Iterable[tuple[bytes | str, bytes | str]] = (),
    *,
    raw: bytes | None = None,
    type_: bytes = b"x",
    **kw: object,
) -> bytes:
    """A pax header (`x`, or `g` for a global one) and its padded data."""
    data = raw if raw is not None else b"".join(record(k, v) for k, v in records)
    return header(b"./PaxHeaders/x", type_=type_, size=len(data), **kw) + padded(data)  # type: ignore[arg-type]


def entry(name: bytes | str, data: bytes = b"", **kw: object) -> bytes:
    """A member header (size from `data` unless given) followed by its padded data."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + padded(data)  # type: ignore[arg-type]


def directory(name: bytes | str, mode: int = 0o755, **kw: object) -> bytes:
    return header(name, type_=b"5", mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: bytes | str, target: bytes | str, **kw: object) -> bytes:
    return header(name, type_=b"2", mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: bytes | str, target: bytes | str, **kw: object) -> bytes:
    return header(name, type_=b"1", linkname=target, **kw)  # type: ignore[arg-type]


def archive(*members: bytes, root: bool = True, end: bytes = END) -> bytes:
    """Root directory, then `members`, then `end` (the end-of-archive marker unless replaced)."""
    parts: list[bytes] = [directory(b"./")] if root else []
    return b"".join(parts + list(members)) + end


def base256(value: int, width: int) -> bytes:
    """GNU's binary numeric form (high bit set): GNU tar reads it even under ustar magic."""
    return bytes([0x80]) + value.to_bytes(width - 1, "big")
