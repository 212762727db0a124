"""Streaming safety gate between the verified part stream and `tar -x`.

The gate and the extractor agree by construction: the gate parses every header itself
(gs_tarheader, which accepts only the forms our snapshot writer produces), checks the member
against MemberPolicy, and then writes *its own* header for it, followed by the member's data
copied through and its own padding. tar never reads a byte of header that the gate did not write,
so no reading quirk (global pax headers, a `prefix` with GNU magic, a file whose name ends in `/`,
`GNU.sparse.name`, base-256 numbers, ...) can make tar see something the gate did not approve.
Refused (ScriptError "unsafe_archive"):

* names that are not canonical `./a/b` paths (absolute, `..`, `.` or empty components, a trailing
  `/` on anything but a directory), names that pass through an earlier symlink, a member that
  replaces an earlier symlink;
* symlinks whose target leaves the tree (relative `..` climbing above the root, or absolute outside
  the final workspace path) unless `allow_external_symlinks` (then they are kept as inert links;
  nothing is ever extracted through them), and empty symlink targets;
* hard links to names that are not earlier non-directory members; a hard link to a symlink member
  is that symlink at a new place (GNU tar links the symlink itself), so it is checked as one;
* device nodes, any non-regular member with data bytes, a stream cut short, a missing end marker,
  non-zero bytes after it.

Neutralised rather than refused: FIFOs (and hard links to them) are not extracted, only listed in
`skipped`; setuid/setgid bits are cleared unless `keep_setuid`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Callable, Dict, List, Optional

from gs_common import ScriptError
from gs_tarheader import (
    BLOCK,
    MAX_PAX_BYTES,
    PAX_TYPE,
    ZERO_BLOCK,
    Member,
    encode,
    encode_as_read,
    make_member,
    parse_header,
    parse_pax,
    unsafe,
)

__all__ = ["MemberPolicy", "gate", "extract_command", "unsafe", "ScriptError"]

SKIPPED_NAMES_KEPT = 100  # names listed in the result; the count is always exact
SMALL_MEMBER = 64 << 10  # members with less data are read and written in one piece


def extract_command(directory: str) -> List[str]:
    """The `tar -x` that reads the gate's output (restore and the tests run exactly this). The
    stream it reads holds only gate-written headers, so no option here is a safety measure except
    the absence of `--absolute-names`; run it with LC_ALL=C so pax names stay raw bytes."""
    cmd = [
        "tar",
        "--extract",
        "--file=-",
        "--directory=" + directory,
        "--numeric-owner",
        "--preserve-permissions",
        "--blocking-factor=128",
    ]
    if os.geteuid() == 0:
        cmd.append("--same-owner")
    return cmd


def _components(name: bytes, what: str) -> List[bytes]:
    if name == b"./":
        return []
    if not name.startswith(b"./"):
        raise unsafe("%s %r is not a ./-relative name" % (what, name))
    parts = name[2:].split(b"/")
    if b"" in parts or b"." in parts or b".." in parts:
        raise unsafe("%s %r has an empty, '.' or '..' component" % (what, name))
    return parts


class MemberPolicy:
    """Stateful per-archive checks; check(member) for each member in stream order."""

    def __init__(self, final_root: str, allow_external_symlinks: bool = False, keep_setuid: bool = False) -> None:
        self.final_root = posixpath.normpath(final_root).encode("utf-8", "surrogateescape")
        self.allow_external = allow_external_symlinks
        self.keep_setuid = keep_setuid
        self.symlinks: Dict[bytes, bytes] = {}  # path -> target, of symlinks and of hard links to them
        self.seen: Dict[bytes, bytes] = {}  # path -> type of every member extracted
        self.dropped: Dict[bytes, bool] = {}  # paths of members not extracted (FIFOs)
        self.members = 0
        self.skipped: List[str] = []
        self.skipped_count = 0
        self.cleared_setuid = 0

    def _through_symlink(self, parts: List[bytes]) -> bool:
        if not self.symlinks:  # most trees: nothing to look up
            return False
        return any(b"/".join(parts[:i]) in self.symlinks for i in range(1, len(parts)))

    def _symlink_escapes(self, parts: List[bytes], target: bytes) -> bool:
        if target.startswith(b"/"):
            norm = posixpath.normpath(target)
            return not (norm == self.final_root or norm.startswith(self.final_root.rstrip(b"/") + b"/"))
        depth = len(parts) - 1  # the link lives in its parent directory
        for comp in target.split(b"/"):
            if comp == b"..":
                depth -= 1
                if depth < 0:
                    return True
            elif comp not in (b"", b"."):
                depth += 1
        return False

    def _add_symlink(self, parts: List[bytes], target: bytes, what: str) -> None:
        if not target:
            raise unsafe("%s has an empty target" % what)
        if self._symlink_escapes(parts, target) and not self.allow_external:
            raise unsafe("%s -> %r leaves the workspace" % (what, target))
        self.symlinks[b"/".join(parts)] = target

    def _skip(self, path: bytes, name: bytes) -> bool:
        self.dropped[path] = True
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_NAMES_KEPT:
            self.skipped.append(name.decode("utf-8", "backslashreplace"))
        return False

    def check(self, m: Member) -> bool:
        """True: extract `m` (its mode may have been cleared); False: leave it out. Raises unsafe()."""
        if m.type == b"5":
            if not m.name.endswith(b"/"):
                raise unsafe("directory %r without a trailing '/'" % m.name)
            parts = _components(m.name if m.name == b"./" else m.name[:-1], "directory")
        else:
            if m.name.endswith(b"/"):  # GNU tar makes a directory of it, and reads its data as headers
                raise unsafe("non-directory member %r ends in '/'" % m.name)
            parts = _components(m.name, "member")
            if not parts:
                raise unsafe("the archive root must be a directory")
        path = b"/".join(parts)
        if self._through_symlink(parts) or path in self.symlinks:
            raise unsafe("member %r goes through or replaces a symlink" % m.name)
        if m.type != b"0" and m.size:
            raise unsafe("non-regular member %r carries %d data bytes" % (m.name, m.size))
        if m.type not in (b"1", b"2") and m.linkname:
            raise unsafe("member %r of type %r has a link target" % (m.name, m.type))
        if m.type == b"6":
            return self._skip(path, m.name)
        if m.type == b"2":
            self._add_symlink(parts, m.linkname, "symlink %r" % m.name)
        elif m.type == b"1":
            target = b"/".join(_components(m.linkname, "hard link target"))
            if target in self.dropped:  # a link to a FIFO left out is left out too
                return self._skip(path, m.name)
            if self._through_symlink(target.split(b"/")) or self.seen.get(target, b"5") == b"5":
                raise unsafe(
                    "hard link %r -> %r does not point to an earlier file of the archive" % (m.name, m.linkname)
                )
            if target in self.symlinks:  # the link's target is relative to its new directory now
                self._add_symlink(parts, self.symlinks[target], "hard link %r to a symlink" % m.name)
        if m.mode & 0o6000 and not self.keep_setuid:
            m.mode &= ~0o6000
            self.cleared_setuid += 1
        self.seen[path] = m.type
        self.dropped.pop(path, None)
        self.members += 1
        return True


class _Input:
    """Exact-size reads over `source` (returns up to n bytes; b"" at the end). Views the source
    hands out are only used before its next call (the source recycles its buffers)."""

    def __init__(self, source: Callable[[int], Any]) -> None:
        self.source = source
        self.view = memoryview(b"")
        self.pos = 0

    def _refill(self) -> bool:
        self.view, self.pos = memoryview(self.source(1 << 20)), 0
        return len(self.view) > 0

    def take(self, n: int, within: str = "a header") -> Optional[bytes]:
        """Exactly n bytes, or None at a clean end of stream; raises when it ends midway."""
        if len(self.view) - self.pos >= n:
            self.pos += n
            return bytes(self.view[self.pos - n : self.pos])
        parts: List[bytes] = []
        need = n
        while need:
            if self.pos >= len(self.view) and not self._refill():
                if need == n:
                    return None
                raise unsafe("the archive ends in the middle of %s" % within)
            chunk = self.view[self.pos : self.pos + need]
            parts.append(bytes(chunk))
            self.pos += len(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def copy(self, n: int, out: "_Output") -> None:
        while n:
            if self.pos >= len(self.view) and not self._refill():
                raise unsafe("the archive ends inside a member's data")
            chunk = self.view[self.pos : self.pos + n]
            out.data(chunk)
            self.pos += len(chunk)
            n -= len(chunk)

    def rest_is_zero(self) -> bool:
        while True:
            chunk = self.view[self.pos :]
            if chunk.nbytes and bytes(chunk).count(0) != chunk.nbytes:
                return False
            if not self._refill():
                return True


class _Output:
    """Coalesces headers and small data into few sink() calls; large views pass through uncopied
    (the sink consumes them before returning)."""

    FLUSH = 1 << 20
    DIRECT = 1 << 18

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.total = 0

    def small(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.FLUSH:
            self.flush()

    def member(self, header: bytes, data: bytes, size: int, pad: int) -> None:
        """A small member at once: its header, its `size` data bytes (of `data`, which may carry the
        source's padding: never forwarded) and our padding."""
        buf = self.buf
        buf += header
        buf += memoryview(data)[:size]
        buf += ZERO_BLOCK[:pad]
        if len(buf) >= self.FLUSH:
            self.flush()

    def data(self, view: memoryview) -> None:
        if view.nbytes < self.DIRECT:
            self.small(view)  # type: ignore[arg-type]
            return
        self.flush()
        self.sink(view)
        self.total += view.nbytes

    def flush(self) -> None:
        if self.buf:
            self.sink(self.buf)
            self.total += len(self.buf)
            self.buf = bytearray()


def gate(source: Callable[[int], Any], sink: Callable[[Any], None], policy: MemberPolicy) -> int:
    """Read the tar stream from `source`, check every member, write a clean tar stream of the
    approved members to `sink`. Returns the number of members extracted (the root included).
    Raises ScriptError("unsafe_archive") on the first refusal; by then `sink` has received only
    headers the gate wrote and data of members it approved."""
    src, out = _Input(source), _Output(sink)
    pax: Optional[Dict[bytes, object]] = None
    pax_padded: Optional[bytes] = None  # the pax header's data as read, zero padding included
    while True:
        block = src.take(BLOCK)
        if block is None:
            raise unsafe("the archive has no end-of-archive marker")
        if block == ZERO_BLOCK:
            if pax is not None:
                raise unsafe("a pax header is followed by the end of the archive")
            if src.take(BLOCK) != ZERO_BLOCK or not src.rest_is_zero():
                raise unsafe("bytes after the end-of-archive marker")
            break
        kind, fields = parse_header(block)
        if kind == PAX_TYPE:
            size = fields["size"]
            if pax is not None or fields["linkname"] or size > MAX_PAX_BYTES:  # type: ignore[operator]
                raise unsafe("pax header repeated, linked or over %d bytes" % MAX_PAX_BYTES)
            data = src.take(size + (-size % BLOCK))  # type: ignore[operator]
            if data is None or data[size:].count(0) != len(data) - size:  # type: ignore[index,operator]
                raise unsafe("pax header cut short or badly padded")
            pax = parse_pax(data[:size])  # type: ignore[index]
            pax_padded = data if len(pax) == 1 and b"mtime" in pax else None
            continue
        member = make_member(kind, fields, pax or {})
        padded, pax, pax_padded = pax_padded, None, None
        if not policy.check(member):
            continue  # only FIFOs and links to them: no data to skip
        header = encode_as_read(member, block, padded, fields["mode"]) or encode(member)  # type: ignore[arg-type]
        size = member.size
        pad = -size % BLOCK  # the source's padding is skipped, never forwarded: tar reads ours
        if size < SMALL_MEMBER:  # most members of a tree of small files: one read, one write
            data = src.take(size + pad, "a member's data") if size else b""
            if data is None:
                raise unsafe("the archive ends inside a member's data")
            out.member(header, data, size, pad)
            continue
        out.small(header)
        src.copy(size, out)
        if pad:
            if src.take(pad) is None:
                raise unsafe("the archive ends inside a member's padding")
            out.small(ZERO_BLOCK[:pad])
    out.small(ZERO_BLOCK * 2)
    out.flush()
    return policy.members
