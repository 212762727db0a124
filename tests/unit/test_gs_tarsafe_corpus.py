"""The hostile-archive corpus: every case goes through the real pipeline restore runs (gate -> GNU
`tar -x` with restore's options, as root here, so a device node or a setuid-root file would really
be created), then the extracted tree is inspected: no device node, FIFO or socket, no setuid/setgid
bit, nothing written outside, no symlink leading out unless allowed.

Each case is either refused (`unsafe_archive`) or neutralised (extracted, made harmless).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_common import ScriptError  # noqa: E402
from gs_tarsafe import MemberPolicy, extract_command, gate  # noqa: E402

from tests.unit.hostile_tars import (  # noqa: E402
    BLOCK,
    END,
    GNU_MAGIC,
    archive,
    base256,
    directory,
    entry,
    hardlink,
    header,
    octal,
    padded,
    pax,
    record,
    symlink,
)

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is needed for the pipeline")

DEVICE = header("./sda", type_=b"4", mode=0o666, raw={"devmajor": octal(8, 8), "devminor": octal(0, 8)})
CHARDEV = header("./null", type_=b"3", mode=0o666, raw={"devmajor": octal(1, 8), "devminor": octal(3, 8)})
SETUID = entry("./suid", b"#!/bin/sh\nid\n", mode=0o4755)
FIFO = header("./fifo", type_=b"6")


class Case(NamedTuple):
    id: str
    make: Callable[[str], bytes]  # outside dir -> archive bytes
    refused: bool = True
    allow_external: bool = False
    keep_setuid: bool = False
    check: Callable[[str], None] | None = None  # on the extracted tree of a neutralised case


def _out(o: str, name: str = "pwned") -> str:
    return os.path.join(o, name)


CASES: list[Case] = [
    # --- the reading disagreements of issue 9 ---------------------------------------------------
    Case("global-pax-size", lambda o: archive(pax([("size", "0")], type_=b"g"), entry("./a", DEVICE + SETUID))),
    Case("global-pax-path", lambda o: archive(pax([("path", _out(o))], type_=b"g"), entry("./a", b"x"))),
    Case("regular-file-named-like-dir", lambda o: archive(entry("./x/", DEVICE + SETUID))),
    Case(
        "prefix-with-gnu-magic", lambda o: archive(header("a", magic=GNU_MAGIC, raw={"prefix": b"../../" + o.encode()}))
    ),
    Case("prefix-with-ustar-magic", lambda o: archive(entry("pwned", b"x", raw={"prefix": o.encode()}))),
    Case(
        "gnu-sparse-name-before-path",
        lambda o: archive(pax([("GNU.sparse.name", "./sda"), ("path", "./ok")]), entry("./ok", b"x")),
    ),
    Case(
        "gnu-sparse-1.0-map",
        lambda o: archive(
            pax([("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.realsize", "10")]),
            entry("./s", b"x"),
        ),
    ),
    # --- classic escapes ----------------------------------------------------------------------------
    Case("absolute-name", lambda o: archive(entry(_out(o), b"pwned"))),
    Case("dotdot-name", lambda o: archive(entry("./../" + os.path.basename(o) + "/pwned", b"pwned"))),
    Case("dotdot-inside-name", lambda o: archive(directory("./a/"), entry("./a/../../x", b"pwned"))),
    Case("name-without-dot-slash", lambda o: archive(entry("etc/passwd", b"x"))),
    Case("dot-component", lambda o: archive(directory("./a/"), entry("./a/./b", b"x"))),
    Case("empty-component", lambda o: archive(entry(".//b", b"x"))),
    Case("symlink-relative-escape", lambda o: archive(symlink("./l", "../../../etc"))),
    Case("symlink-absolute-escape", lambda o: archive(symlink("./l", o))),
    Case(
        "symlink-then-write-through",
        lambda o: archive(directory("./sub/"), symlink("./l", "sub"), entry("./l/x", b"through")),
    ),
    Case(
        "external-symlink-then-write-through",
        lambda o: archive(symlink("./l", o), entry("./l/pwned", b"x")),
        allow_external=True,
    ),
    Case(
        "symlink-chain-then-write",
        lambda o: archive(symlink("./b", o), symlink("./a", "b"), entry("./a/pwned", b"x")),
        allow_external=True,
    ),
    Case(
        "dir-swapped-for-symlink",
        lambda o: archive(directory("./d/"), symlink("./d", o), entry("./d/pwned", b"x")),
        allow_external=True,
    ),
    Case("symlink-replaced-by-file", lambda o: archive(symlink("./s", "x"), entry("./s", b"x"))),
    Case("symlink-replaced-by-dir", lambda o: archive(symlink("./s", "x"), directory("./s/"))),
    Case("empty-symlink-target", lambda o: archive(symlink("./s", ""))),
    Case("pax-path-absolute", lambda o: archive(pax([("path", _out(o))]), entry("./harmless", b"pwned"))),
    Case("pax-path-dotdot", lambda o: archive(pax([("path", "./../x")]), entry("./harmless", b"pwned"))),
    Case(
        "pax-path-through-symlink",
        lambda o: archive(
            directory("./sub/"), symlink("./l", "sub"), pax([("path", "./l/x")]), entry("./harmless", b"x")
        ),
    ),
    Case("pax-linkpath-escape", lambda o: archive(pax([("linkpath", "../../etc")]), symlink("./l", "ok"))),
    Case("hardlink-absolute", lambda o: archive(hardlink("./h", "/etc/passwd"))),
    Case("hardlink-dotdot", lambda o: archive(hardlink("./h", "./../x"))),
    Case("hardlink-unseen", lambda o: archive(hardlink("./h", "./later"), entry("./later", b"x"))),
    Case("hardlink-to-directory", lambda o: archive(directory("./d/"), hardlink("./h", "./d"))),
    Case(
        "hardlink-to-symlink-then-write",
        lambda o: archive(directory("./sub/"), symlink("./s", "sub"), hardlink("./h", "./s"), entry("./h/x", b"x")),
    ),
    Case(
        "hardlink-to-symlink-escapes",
        lambda o: archive(directory("./a/"), symlink("./a/l", "../x"), hardlink("./h", "./a/l")),
    ),
    Case(
        "hardlink-with-data", lambda o: archive(entry("./f", b"x"), entry("./h", DEVICE, type_=b"1", linkname=b"./f"))
    ),
    # --- special files ------------------------------------------------------------------------------
    Case("block-device-0666", lambda o: archive(DEVICE)),
    Case("char-device", lambda o: archive(CHARDEV)),
    Case("device-after-good-members", lambda o: archive(entry("./a", b"a" * 3000), DEVICE)),
    Case("contiguous-type-7", lambda o: archive(entry("./c", b"x", type_=b"7"))),
    Case("old-regular-type-nul", lambda o: archive(entry("./c", b"x", type_=b"\0"))),
    Case(
        "gnu-long-name-L",
        lambda o: archive(
            entry("././@LongLink", padded(_out(o).encode() + b"\0"), type_=b"L"), entry("./short", b"pwned")
        ),
    ),
    Case(
        "gnu-long-link-K",
        lambda o: archive(entry("././@LongLink", padded(b"/etc\0"), type_=b"K"), symlink("./l", "ok")),
    ),
    Case("gnu-old-sparse-S", lambda o: archive(entry("./s", b"x", type_=b"S"))),
    Case("gnu-volume-header-V", lambda o: archive(header("vol", type_=b"V"))),
    Case("gnu-multivolume-M", lambda o: archive(entry("./m", b"x", type_=b"M"))),
    Case("solaris-acl-A", lambda o: archive(entry("./m", b"x", type_=b"A"))),
    Case("directory-with-data", lambda o: archive(entry("./d/", DEVICE, type_=b"5"))),
    Case("symlink-with-data", lambda o: archive(entry("./l", DEVICE, type_=b"2", linkname=b"x"))),
    Case("fifo-with-data", lambda o: archive(entry("./p", DEVICE, type_=b"6"))),
    Case("dir-without-slash", lambda o: archive(directory("./d"))),
    Case("root-is-a-file", lambda o: archive(entry("./", b"x"), root=False)),
    Case("link-target-on-regular-file", lambda o: archive(entry("./f", b"x", linkname=b"/etc/passwd"))),
    Case("device-numbers-on-file", lambda o: archive(entry("./f", b"x", raw={"devmajor": octal(8, 8)}))),
    Case("file-type-bits-in-mode", lambda o: archive(entry("./f", b"x", mode=0o60644))),
    # --- framing --------------------------------------------------------------------------------------
    Case("size-past-stream-end", lambda o: archive(header("./big", size=1 << 30), end=b"x" * 1000)),
    Case("stream-ends-mid-header", lambda o: archive(entry("./a", b"x"), end=header("./b")[:300])),
    Case("no-end-marker", lambda o: archive(entry("./a", b"x"), end=b"")),
    Case("lone-zero-block-then-member", lambda o: archive(end=bytes(BLOCK) + entry("./late", b"x") + END)),
    Case("garbage-after-end", lambda o: archive(entry("./a", b"x"), end=END + b"\1" * BLOCK)),
    Case("bad-checksum", lambda o: archive(header("./a", chksum=b"000000\0 "))),
    Case(
        "signed-checksum-only",
        lambda o: archive(
            header(
                b"./\xe9",
                chksum=b"%06o\0 "
                % (  # GNU tar takes it
                    int(header(b"./\xe9")[148:154], 8) - 256
                ),
            )
        ),
    ),
    Case("v7-header-no-magic", lambda o: archive(header("./a", magic=bytes(8)))),
    Case("base256-size", lambda o: archive(header("./a", raw={"size": base256(BLOCK, 12)}) + DEVICE)),
    Case("base256-uid", lambda o: archive(entry("./a", b"x", raw={"uid": base256(0, 8)}))),
    Case("octal-with-leading-spaces", lambda o: archive(entry("./a", b"x", raw={"mode": b"   644\0 "}))),
    Case("octal-without-terminator", lambda o: archive(entry("./a", b"x", raw={"mode": b"00000644"}))),
    Case("nul-in-name", lambda o: archive(entry(b"./ok\0../../x", b"x"))),
    Case("nul-in-linkname", lambda o: archive(symlink("./l", b"ok\0/etc"))),
    Case("nul-in-pax-path", lambda o: archive(pax([("path", b"./ok\0../../x")]), entry("./a", b"x"))),
    Case("non-zero-padding", lambda o: archive(entry("./a", b"x", raw={"pad": b"\1"}))),
    # --- pax headers ----------------------------------------------------------------------------------
    Case(
        "huge-pax-header",
        lambda o: archive(header("./PaxHeaders/x", type_=b"x", size=1 << 30) + record("path", "./a") + END),
    ),
    Case("pax-length-too-long", lambda o: archive(pax(raw=b"99 path=./a\n"), entry("./a", b"x"))),
    Case("pax-length-too-short", lambda o: archive(pax(raw=b"5 path=./a\n"), entry("./a", b"x"))),
    Case("pax-length-leading-zero", lambda o: archive(pax(raw=b"012 path=./a\n"), entry("./a", b"x"))),
    Case("pax-length-not-a-number", lambda o: archive(pax(raw=b"x path=./a\n"), entry("./a", b"x"))),
    Case("pax-record-without-equals", lambda o: archive(pax(raw=b"11 path./a\n"), entry("./a", b"x"))),
    Case("pax-trailing-bytes", lambda o: archive(pax(raw=record("path", "./a") + b"\0junk"), entry("./a", b"x"))),
    Case("pax-duplicate-path", lambda o: archive(pax([("path", "./ok"), ("path", _out(o))]), entry("./a", b"x"))),
    Case("pax-unknown-keyword", lambda o: archive(pax([("comment", "hi")]), entry("./a", b"x"))),
    Case(
        "pax-file-capability-xattr",
        lambda o: archive(pax([("SCHILY.xattr.security.capability", "\1\2\3")]), entry("./a", b"x")),
    ),
    Case(
        "pax-hdrcharset-utf8", lambda o: archive(pax([("hdrcharset", "ISO-IR 10646 2000 UTF-8")]), entry("./a", b"x"))
    ),
    Case("pax-uname-twice", lambda o: archive(pax([("uname", "a"), ("uname", "root")]), entry("./a", b"x"))),
    Case("pax-then-pax", lambda o: archive(pax([("path", "./a")]), pax([("path", "./b")]), entry("./c", b"x"))),
    Case("pax-then-end", lambda o: archive(pax([("path", "./a")]))),
    Case("pax-linked", lambda o: archive(pax([("path", "./a")], linkname=b"x"), entry("./a", b"x"))),
    Case("pax-size-hides-device", lambda o: archive(pax([("size", "0")]), entry("./a", DEVICE + SETUID))),
    Case("pax-size-not-decimal", lambda o: archive(pax([("size", "0x10")]), entry("./a", b"x"))),
    Case("pax-uid-out-of-range", lambda o: archive(pax([("uid", "99999999999")]), entry("./a", b"x"))),
    Case("pax-mtime-malformed", lambda o: archive(pax([("mtime", "1e9")]), entry("./a", b"x"))),
    Case(
        "sparse-map-short",
        lambda o: archive(
            pax(
                [
                    ("GNU.sparse.size", "10"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.offset", "0"),
                    ("GNU.sparse.numbytes", "1"),
                ]
            ),
            entry("./s", b"x"),
        ),
    ),
    Case(
        "sparse-map-overlap",
        lambda o: archive(
            pax(
                [
                    ("GNU.sparse.size", "10"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.offset", "4"),
                    ("GNU.sparse.numbytes", "2"),
                    ("GNU.sparse.offset", "5"),
                    ("GNU.sparse.numbytes", "2"),
                ]
            ),
            entry("./s", b"xxxx"),
        ),
    ),
    Case(
        "sparse-map-past-size",
        lambda o: archive(
            pax(
                [
                    ("GNU.sparse.size", "1"),
                    ("GNU.sparse.numblocks", "1"),
                    ("GNU.sparse.offset", "0"),
                    ("GNU.sparse.numbytes", "4"),
                ]
            ),
            entry("./s", b"xxxx"),
        ),
    ),
    Case(
        "sparse-map-wrong-total",
        lambda o: archive(
            pax(
                [
                    ("GNU.sparse.size", "9"),
                    ("GNU.sparse.numblocks", "1"),
                    ("GNU.sparse.offset", "0"),
                    ("GNU.sparse.numbytes", "2"),
                ]
            ),
            entry("./s", b"xxxx"),
        ),
    ),
    Case(
        "sparse-map-on-symlink",
        lambda o: archive(pax([("GNU.sparse.size", "0"), ("GNU.sparse.numblocks", "0")]), symlink("./l", "x")),
    ),
    Case(
        "sparse-map-out-of-order",
        lambda o: archive(
            pax(
                [
                    ("GNU.sparse.size", "4"),
                    ("GNU.sparse.numblocks", "1"),
                    ("GNU.sparse.numbytes", "4"),
                    ("GNU.sparse.offset", "0"),
                ]
            ),
            entry("./s", b"xxxx"),
        ),
    ),
]


# why each case is refused: the gate's exact message, the outside directory written <o>
WHY = {
    "global-pax-size": "header type b'g' is not allowed",
    "global-pax-path": "header type b'g' is not allowed",
    "regular-file-named-like-dir": "non-directory member b'./x/' ends in '/'",
    "prefix-with-gnu-magic": "header is not POSIX ustar (magic b'ustar  \\x00')",
    "prefix-with-ustar-magic": "header has device numbers, a prefix or non-zero padding",
    "gnu-sparse-name-before-path": "pax record b'GNU.sparse.name' is not one our snapshots write",
    "gnu-sparse-1.0-map": "pax record b'GNU.sparse.major' is not one our snapshots write",
    "absolute-name": "member b'<o>/pwned' is not a ./-relative name",
    "dotdot-name": "member b'./../outside/pwned' has an empty, '.' or '..' component",
    "dotdot-inside-name": "member b'./a/../../x' has an empty, '.' or '..' component",
    "name-without-dot-slash": "member b'etc/passwd' is not a ./-relative name",
    "dot-component": "member b'./a/./b' has an empty, '.' or '..' component",
    "empty-component": "member b'.//b' has an empty, '.' or '..' component",
    "symlink-relative-escape": "symlink b'./l' -> b'../../../etc' leaves the workspace",
    "symlink-absolute-escape": "symlink b'./l' -> b'<o>' leaves the workspace",
    "symlink-then-write-through": "member b'./l/x' goes through or replaces a symlink",
    "external-symlink-then-write-through": "member b'./l/pwned' goes through or replaces a symlink",
    "symlink-chain-then-write": "member b'./a/pwned' goes through or replaces a symlink",
    "dir-swapped-for-symlink": "member b'./d/pwned' goes through or replaces a symlink",
    "symlink-replaced-by-file": "member b'./s' goes through or replaces a symlink",
    "symlink-replaced-by-dir": "member b'./s/' goes through or replaces a symlink",
    "empty-symlink-target": "symlink b'./s' has an empty target",
    "pax-path-absolute": "member b'<o>/pwned' is not a ./-relative name",
    "pax-path-dotdot": "member b'./../x' has an empty, '.' or '..' component",
    "pax-path-through-symlink": "member b'./l/x' goes through or replaces a symlink",
    "pax-linkpath-escape": "symlink b'./l' -> b'../../etc' leaves the workspace",
    "hardlink-absolute": "hard link target b'/etc/passwd' is not a ./-relative name",
    "hardlink-dotdot": "hard link target b'./../x' has an empty, '.' or '..' component",
    "hardlink-unseen": "hard link b'./h' -> b'./later' does not point to an earlier file of the archive",
    "hardlink-to-directory": "hard link b'./h' -> b'./d' does not point to an earlier file of the archive",
    "hardlink-to-symlink-then-write": "member b'./h/x' goes through or replaces a symlink",
    "hardlink-to-symlink-escapes": "hard link b'./h' to a symlink -> b'../x' leaves the workspace",
    "hardlink-with-data": "non-regular member b'./h' carries 512 data bytes",
    "block-device-0666": "device node b'./sda' is not allowed",
    "char-device": "device node b'./null' is not allowed",
    "device-after-good-members": "device node b'./sda' is not allowed",
    "contiguous-type-7": "header type b'7' is not allowed",
    "old-regular-type-nul": "header type b'\\x00' is not allowed",
    "gnu-long-name-L": "header type b'L' is not allowed",
    "gnu-long-link-K": "header type b'K' is not allowed",
    "gnu-old-sparse-S": "header type b'S' is not allowed",
    "gnu-volume-header-V": "header type b'V' is not allowed",
    "gnu-multivolume-M": "header type b'M' is not allowed",
    "solaris-acl-A": "header type b'A' is not allowed",
    "directory-with-data": "non-regular member b'./d/' carries 512 data bytes",
    "symlink-with-data": "non-regular member b'./l' carries 512 data bytes",
    "fifo-with-data": "non-regular member b'./p' carries 512 data bytes",
    "dir-without-slash": "directory b'./d' without a trailing '/'",
    "root-is-a-file": "non-directory member b'./' ends in '/'",
    "link-target-on-regular-file": "member b'./f' of type b'0' has a link target",
    "device-numbers-on-file": "header has device numbers, a prefix or non-zero padding",
    "file-type-bits-in-mode": "mode 60644 has bits beyond 07777",
    "size-past-stream-end": "the archive ends inside a member's data",
    "stream-ends-mid-header": "the archive ends in the middle of a header",
    "no-end-marker": "the archive has no end-of-archive marker",
    "lone-zero-block-then-member": "bytes after the end-of-archive marker",
    "garbage-after-end": "bytes after the end-of-archive marker",
    "bad-checksum": "header checksum mismatch",
    "signed-checksum-only": "header checksum mismatch",
    "v7-header-no-magic": "header is not POSIX ustar (magic b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00')",
    "base256-size": "mode, uid, gid, size, mtime or checksum is not plain zero-padded octal",
    "base256-uid": "mode, uid, gid, size, mtime or checksum is not plain zero-padded octal",
    "octal-with-leading-spaces": "mode, uid, gid, size, mtime or checksum is not plain zero-padded octal",
    "octal-without-terminator": "mode, uid, gid, size, mtime or checksum is not plain zero-padded octal",
    "nul-in-name": "name field has bytes after its NUL terminator",
    "nul-in-linkname": "linkname field has bytes after its NUL terminator",
    "nul-in-pax-path": "pax record b'path' holds a NUL byte",
    "non-zero-padding": "header has device numbers, a prefix or non-zero padding",
    "huge-pax-header": "pax header repeated, linked or over 67108864 bytes",
    "pax-length-too-long": "malformed pax record at byte 0",
    "pax-length-too-short": "malformed pax record at byte 0",
    "pax-length-leading-zero": "malformed pax record length at byte 0",
    "pax-length-not-a-number": "malformed pax record length at byte 0",
    "pax-record-without-equals": "malformed pax record at byte 0",
    "pax-trailing-bytes": "malformed pax record length at byte 12",
    "pax-duplicate-path": "pax record b'path' repeated",
    "pax-unknown-keyword": "pax record b'comment' is not one our snapshots write",
    "pax-file-capability-xattr": "pax record b'SCHILY.xattr.security.capability' is not one our snapshots write",
    "pax-hdrcharset-utf8": "pax hdrcharset b'ISO-IR 10646 2000 UTF-8' is not BINARY",
    "pax-uname-twice": "pax record b'uname' repeated",
    "pax-then-pax": "pax header repeated, linked or over 67108864 bytes",
    "pax-then-end": "a pax header is followed by the end of the archive",
    "pax-linked": "pax header repeated, linked or over 67108864 bytes",
    "pax-size-hides-device": "device node b'./sda' is not allowed",
    "pax-size-not-decimal": "pax b'size' value b'0x10' is not a decimal number",
    "pax-uid-out-of-range": "pax b'uid' value 99999999999 is out of range",
    "pax-mtime-malformed": "pax mtime b'1e9' is malformed",
    "sparse-map-short": "incomplete or malformed sparse map",
    "sparse-map-overlap": "sparse map fragments overlap, go backwards or pass the file size",
    "sparse-map-past-size": "sparse map fragments overlap, go backwards or pass the file size",
    "sparse-map-wrong-total": "sparse map covers 2 bytes, the member stores 4",
    "sparse-map-on-symlink": "sparse map on a member that is not a regular file",
    "sparse-map-out-of-order": "sparse map records out of order",
}


def _no_setuid(ws: str) -> None:
    assert stat.S_IMODE(os.lstat(os.path.join(ws, "suid")).st_mode) == 0o755


def _keeps_setuid(ws: str) -> None:
    assert stat.S_IMODE(os.lstat(os.path.join(ws, "suid")).st_mode) == 0o4755


def _no_fifo(ws: str) -> None:
    assert sorted(os.listdir(ws)) == ["after"]


def _hidden_headers_are_data(ws: str) -> None:
    with open(os.path.join(ws, "a"), "rb") as fh:
        assert fh.read(BLOCK) == DEVICE  # the "header" in the data stays data
    assert sorted(os.listdir(ws)) == ["a"]


def _sticky_kept_setgid_cleared(ws: str) -> None:
    assert stat.S_IMODE(os.lstat(os.path.join(ws, "shared")).st_mode) == 0o1777
    assert stat.S_IMODE(os.lstat(os.path.join(ws, "group")).st_mode) == 0o775


def _inert_link(ws: str) -> None:
    assert os.readlink(os.path.join(ws, "python")).startswith("/")


NEUTRALISED: list[Case] = [
    Case("setuid-root-file", lambda o: archive(SETUID), refused=False, check=_no_setuid),
    Case(
        "setgid-dir-and-sticky-dir",
        lambda o: archive(directory("./shared/", mode=0o1777), directory("./group/", mode=0o2775)),
        refused=False,
        check=_sticky_kept_setgid_cleared,
    ),
    Case("setuid-kept-when-asked", lambda o: archive(SETUID), refused=False, keep_setuid=True, check=_keeps_setuid),
    Case(
        "fifo-and-link-to-it",
        lambda o: archive(FIFO, hardlink("./fifo2", "./fifo"), entry("./after", b"x")),
        refused=False,
        check=_no_fifo,
    ),
    Case(
        "pax-size-swallows-device",
        lambda o: archive(pax([("size", str(2 * BLOCK))]), entry("./a", DEVICE + bytes(BLOCK), size=0)),
        refused=False,
        check=_hidden_headers_are_data,
    ),
    Case(
        "setuid-hidden-by-root-mode",
        lambda o: archive(directory("./", mode=0o6755), SETUID, root=False),
        refused=False,
        check=_no_setuid,
    ),
    Case(
        "external-symlink-allowed",
        lambda o: archive(symlink("./python", "/usr/bin/python3")),
        refused=False,
        allow_external=True,
        check=_inert_link,
    ),
]


def _odd_but_legit(ws: str) -> None:
    base = os.fsencode(ws)
    long_dir = os.path.join(base, b"d" * 120)
    with open(os.path.join(long_dir, b"line\nbreak \\ \xff" + b"n" * 130), "rb") as fh:
        assert fh.read() == b"odd"
    st = os.lstat(os.path.join(base, b"old"))
    assert st.st_mtime_ns == 1000000000_500000000 and (st.st_uid, st.st_gid) == (3000000, 4294967294)
    assert os.readlink(os.path.join(base, b"t")) == b"d" * 120 + b"/" + b"z" * 100
    assert os.path.samefile(os.path.join(base, b"old"), os.path.join(base, b"hard"))


ODD_NAME = b"./" + b"d" * 120 + b"/line\nbreak \\ \xff" + b"n" * 130

NEUTRALISED.append(
    Case(
        "odd-but-legit-members",
        lambda o: archive(
            pax([("path", b"./" + b"d" * 120 + b"/")]) + directory("./@x/"),
            pax([("path", ODD_NAME)]) + entry("./@y", b"odd"),
            pax([("mtime", "1000000000.5"), ("uid", "3000000"), ("gid", "4294967294")]) + entry("./old", b"o"),
            hardlink("./hard", "./old"),
            pax([("linkpath", b"d" * 120 + b"/" + b"z" * 100)]) + symlink("./t", "x"),
        ),
        refused=False,
        check=_odd_but_legit,
    )
)


def _owner_by_number(ws: str) -> None:
    st = os.lstat(os.path.join(ws, "a"))
    assert (st.st_uid, st.st_gid) == (1000, 1000) and st.st_mtime == 981173106


NEUTRALISED.append(
    Case(
        "owner-names-are-not-used",
        lambda o: archive(
            pax([("uname", "root"), ("gname", "root"), ("atime", "1.5"), ("ctime", "2")])
            + entry("./a", b"x", uid=1000, gid=1000, raw={"uname": b"root", "gname": b"root"})
        ),
        refused=False,
        check=_owner_by_number,
    )
)


def run_pipeline(stream: bytes, ws: str, case: Case, step: int = 700) -> tuple[ScriptError | None, bytes]:
    """gate | tar -x, as restore wires them; returns the gate's refusal (or None) and tar's stderr."""
    proc = subprocess.Popen(
        extract_command(ws), stdin=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=dict(os.environ, LC_ALL="C")
    )
    pos = [0]

    def source(n: int) -> bytes:
        chunk = stream[pos[0] : pos[0] + min(n, step)]
        pos[0] += len(chunk)
        return chunk

    def sink(data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[proc.stdin.write(view) :]  # type: ignore[union-attr]

    error: ScriptError | None = None
    try:
        gate(source, sink, MemberPolicy(ws, case.allow_external, case.keep_setuid))
    except ScriptError as exc:
        error = exc
    except BrokenPipeError:
        pass
    proc.stdin.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    proc.wait(timeout=60)
    return error, err


def assert_nothing_unsafe(ws: str, outside: str, case: Case) -> None:
    assert os.listdir(outside) == [], "something was written outside the workspace"
    root = os.path.realpath(ws)
    for dirpath, dirnames, filenames in os.walk(ws):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode), path
            if not case.keep_setuid:
                assert not st.st_mode & 0o6000, "%s keeps a setuid/setgid bit" % path
            if stat.S_ISLNK(st.st_mode) and not case.allow_external:
                real = os.path.realpath(path)
                assert real == root or real.startswith(root + os.sep), "%s leads out to %s" % (path, real)
    assert not os.lstat(ws).st_mode & 0o6000 or case.keep_setuid


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_archive_is_refused(case: Case, tmp_path: Any) -> None:
    outside, ws = str(tmp_path / "outside"), str(tmp_path / "ws")
    os.makedirs(outside)
    os.makedirs(ws)
    error, _ = run_pipeline(case.make(outside), ws, case)
    assert error is not None and error.code == "unsafe_archive", "gate let %s through" % case.id
    assert error.message.replace(outside, "<o>") == WHY[case.id]
    assert_nothing_unsafe(ws, outside, case)


@pytest.mark.parametrize("case", NEUTRALISED, ids=[c.id for c in NEUTRALISED])
def test_hostile_archive_is_neutralised(case: Case, tmp_path: Any) -> None:
    outside, ws = str(tmp_path / "outside"), str(tmp_path / "ws")
    os.makedirs(outside)
    os.makedirs(ws)
    error, tar_err = run_pipeline(case.make(outside), ws, case)
    assert error is None, error
    assert tar_err == b"", tar_err
    assert_nothing_unsafe(ws, outside, case)
    assert case.check is not None
    case.check(ws)


def test_corpus_is_large_and_ids_unique() -> None:
    ids = [c.id for c in CASES + NEUTRALISED]
    assert len(ids) == len(set(ids)) and len(CASES) >= 60
