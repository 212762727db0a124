"""Streaming safety gate between the verified part stream and `tar -x`.

Python's tarfile parses the stream in pipe mode (`r|`, never seeks, bounded buffer) and every member
header is checked by MemberPolicy *before* its bytes are forwarded to GNU tar: the gate only releases
bytes up to the end of the last member that passed, so tar never sees a refused header. What is
refused (ScriptError "unsafe_archive"):

* absolute names, names with a `..` component, names that pass through an earlier symlink member,
  a member that replaces an earlier symlink;
* symlinks whose target leaves the tree (relative `..` climbing above the root, or absolute outside
  the final workspace path) unless `allow_external_symlinks` (then they are kept as inert links;
  nothing is ever extracted through them);
* hard links to absolute, `..`, or not-yet-seen names; a hard link to a symlink member is that
  symlink at a new place (GNU tar links the symlink itself), so it is checked and tracked as one;
* character/block devices and unknown member types; any non-regular member with a data size
  (GNU tar and tarfile would disagree on where the next header starts);
* unreadable headers, and non-zero bytes after the end-of-archive marker.

FIFOs are allowed (a workspace may hold one; it is harmless). Device nodes are refused.
"""
from __future__ import annotations

import posixpath
import tarfile
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Set, Tuple

from gs_common import ScriptError

_OK_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE,
             tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE)


def unsafe(message: str) -> ScriptError:
    return ScriptError("unsafe_archive", message)


def _components(name: str, what: str) -> List[str]:
    if name.startswith("/"):
        raise unsafe("%s %r is absolute" % (what, name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise unsafe("%s %r contains '..'" % (what, name))
    return parts


class MemberPolicy:
    """Stateful per-archive checks; call check(member) for each header in stream order."""

    def __init__(self, final_root: str, allow_external_symlinks: bool = False) -> None:
        self.final_root = posixpath.normpath(final_root)
        self.allow_external = allow_external_symlinks
        self.symlinks: Dict[str, str] = {}  # path -> target, of symlinks and of hard links to them
        self.seen: Set[str] = set()
        self.members = 0

    def _through_symlink(self, parts: List[str]) -> bool:
        return any("/".join(parts[:i]) in self.symlinks for i in range(1, len(parts)))

    def _symlink_escapes(self, parts: List[str], target: str) -> bool:
        if target.startswith("/"):
            norm = posixpath.normpath(target)
            return not (norm == self.final_root or norm.startswith(self.final_root.rstrip("/") + "/"))
        depth = len(parts) - 1  # the link lives in its parent directory
        for comp in target.split("/"):
            if comp == "..":
                depth -= 1
                if depth < 0:
                    return True
            elif comp not in ("", "."):
                depth += 1
        return False

    def _add_symlink(self, parts: List[str], target: str, what: str) -> None:
        if self._symlink_escapes(parts, target) and not self.allow_external:
            raise unsafe("%s -> %r leaves the workspace" % (what, target))
        self.symlinks["/".join(parts)] = target

    def check(self, member: tarfile.TarInfo) -> None:
        parts = _components(member.name, "member")
        path = "/".join(parts)
        if self._through_symlink(parts) or path in self.symlinks:
            raise unsafe("member %r goes through or replaces a symlink" % member.name)
        if member.type not in _OK_TYPES:
            kind = "device node" if member.ischr() or member.isblk() else "member type %r" % member.type
            raise unsafe("%s %r is not allowed" % (kind, member.name))
        if not member.isreg() and member.size:
            raise unsafe("non-regular member %r carries %d data bytes" % (member.name, member.size))
        if not parts and not member.isdir():
            raise unsafe("the archive root must be a directory")
        if member.issym():
            self._add_symlink(parts, member.linkname, "symlink %r" % member.name)
        elif member.islnk():
            target = _components(member.linkname, "hard link target")
            joined = "/".join(target)
            if self._through_symlink(target) or joined not in self.seen:
                raise unsafe("hard link %r -> %r points outside the archive" % (member.name, member.linkname))
            if joined in self.symlinks:  # the link's target is relative to its new directory now
                self._add_symlink(parts, self.symlinks[joined], "hard link %r to a symlink" % member.name)
        self.seen.add(path)
        self.members += 1


class GatedTee:
    """File-like reader for tarfile that forwards the bytes tarfile has consumed to `sink`, but only
    up to `allow(offset)`: bytes past the last approved member wait in `pending` until approved."""

    def __init__(self, source: Callable[[int], Any], sink: Callable[[Any], None]) -> None:
        self._source = source
        self._sink = sink
        self.pos = 0          # bytes handed to tarfile
        self.sent = 0         # bytes forwarded to the sink
        self.allowed = 0
        self._pending: Deque[Tuple[int, Any]] = deque()

    def read(self, size: int = -1) -> Any:
        data = self._source(size if size and size > 0 else 1 << 20)
        if len(data):
            self._pending.append((self.pos, data))
            self.pos += len(data)
            self._flush()
            # The source recycles its buffers once it moves on: keep only copies of held-back bytes.
            self._pending = deque((start, bytes(chunk)) for start, chunk in self._pending)
        return data

    def allow(self, upto: int) -> None:
        if upto > self.allowed:
            self.allowed = upto
            self._flush()

    def _flush(self) -> None:
        while self._pending and self.sent < self.allowed:
            start, data = self._pending[0]
            view = memoryview(data)[self.sent - start:]
            room = self.allowed - self.sent
            if len(view) > room:
                self._sink(view[:room])
                self.sent += room
                return
            self._pending.popleft()
            self._sink(view)
            self.sent += len(view)

    def finish(self) -> None:
        """After the end-of-archive marker: everything left must be zero padding; forward it."""
        for start, data in self._pending:
            chunk = memoryview(data)[max(0, self.sent - start):]
            self._forward_zeros(chunk)
        self._pending.clear()
        while True:
            data = self._source(1 << 20)
            if not len(data):
                break
            self._forward_zeros(memoryview(data))

    def _forward_zeros(self, chunk: Any) -> None:
        if bytes(chunk).strip(b"\0"):
            raise unsafe("data after the end-of-archive marker")
        self._sink(chunk)
        self.sent += len(chunk)


def gate(source: Callable[[int], Any], sink: Callable[[Any], None], policy: MemberPolicy,
         bufsize: int = 1 << 16) -> int:
    """Parse the tar stream from `source`, check every member, forward approved bytes to `sink`.

    Returns the number of members. Raises ScriptError("unsafe_archive") on the first refusal; by
    then `sink` has received only bytes of approved members."""
    tee = GatedTee(source, sink)
    try:
        archive = tarfile.open(fileobj=tee, mode="r|", bufsize=bufsize,  # type: ignore[call-overload]
                               encoding="utf-8", errors="surrogateescape")
        while True:
            member = archive.next()
            if member is None:
                break
            policy.check(member)
            archive.members.clear()  # stream mode keeps every TarInfo otherwise: O(files) memory
            tee.allow(archive.offset)  # end of this member's data (sparse-aware, set by tarfile)
    except tarfile.TarError as exc:
        raise unsafe("unreadable tar stream: %s" % exc) from None
    tee.finish()
    return policy.members
