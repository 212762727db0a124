"""gs_tarsafe: the streaming member gate (pure: in-memory tar streams, no tar binary, no network).

The hostile-archive corpus, run through real GNU tar, is test_gs_tarsafe_corpus.py."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_common import ScriptError  # noqa: E402
from gs_tarsafe import MemberPolicy, gate  # noqa: E402


def build(add: Callable[[tarfile.TarFile], None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        add(tar)
    return buf.getvalue()


def member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def run_gate(stream: bytes, root: str = "/workspace", allow_external: bool = False, step: int = 700) -> bytes:
    """Feed `stream` in odd-sized chunks; return what reached the sink."""
    src = io.BytesIO(stream)
    out: list[bytes] = []
    gate(lambda n: src.read(min(n, step)), lambda v: out.append(bytes(v)), MemberPolicy(root, allow_external))
    return b"".join(out)


def _members(stream: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
        for m in tar:
            data = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname, data))
    return out


SAFE_MEMBERS = [
    lambda t: member(t, "./a.txt", b"x" * 5000, mtime=981173106.123456789, uid=1000, gid=1000, mode=0o640),
    lambda t: member(t, "./dir/", type=tarfile.DIRTYPE, mode=0o1777),
    lambda t: member(t, "./dir/link", type=tarfile.SYMTYPE, linkname="../a.txt"),
    lambda t: member(t, "./hard", type=tarfile.LNKTYPE, linkname="./a.txt"),
    lambda t: member(t, "./" + "n" * 200, b"long name"),
    lambda t: member(t, "./dir/" + "l" * 150, type=tarfile.SYMTYPE, linkname="t" * 300),
    lambda t: member(t, "./big-ids", b"ids", uid=1 << 30, gid=(1 << 32) - 2, mtime=1 << 40),
    lambda t: member(t, "./utf-\u00e9t\u00e9", b"utf8"),
    lambda t: member(t, "./abs-inside", type=tarfile.SYMTYPE, linkname="/workspace/a.txt"),
]


@pytest.mark.parametrize("step", [1, 511, 700, 1 << 20])
def test_safe_stream_is_rewritten_with_the_same_members(step: int) -> None:
    stream = build(lambda t: [add(t) for add in SAFE_MEMBERS])
    out = run_gate(stream, step=step)
    assert _members(out) == _members(stream)
    assert len(out) % 512 == 0 and out.endswith(bytes(1024))


def test_fifo_is_left_out_and_setuid_cleared_unless_kept() -> None:
    stream = build(
        lambda t: (
            member(t, "./fifo", type=tarfile.FIFOTYPE),
            member(t, "./s", b"x", mode=0o6755),
            member(t, "./after", b"y"),
        )
    )
    src = io.BytesIO(stream)
    policy = MemberPolicy("/workspace")
    sunk: list[bytes] = []
    assert gate(src.read, lambda v: sunk.append(bytes(v)), policy) == 3
    got = {m[0]: m for m in _members(b"".join(sunk))}
    assert sorted(got) == [".", "./after", "./s"]
    assert got["./s"][2] == 0o755 and policy.skipped == ["./fifo"] and policy.cleared_setuid == 1
    kept = io.BytesIO(stream)
    sunk.clear()
    gate(kept.read, lambda v: sunk.append(bytes(v)), MemberPolicy("/workspace", keep_setuid=True))
    assert {m[0]: m for m in _members(b"".join(sunk))}["./s"][2] == 0o6755


@pytest.mark.parametrize(
    "add",
    [
        lambda t: member(t, "../escape", b"x"),
        lambda t: member(t, "./a/../../escape", b"x"),
        lambda t: member(t, "/etc/passwd", b"x"),
        lambda t: member(t, "./l", type=tarfile.SYMTYPE, linkname="../../etc"),
        lambda t: member(t, "./l", type=tarfile.SYMTYPE, linkname="/etc"),
        lambda t: member(t, "./h", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
        lambda t: member(t, "./h", type=tarfile.LNKTYPE, linkname="./never-seen"),
        lambda t: member(t, "./null", type=tarfile.CHRTYPE),
        lambda t: member(t, "./sda", type=tarfile.BLKTYPE),
        lambda t: (member(t, "./d", type=tarfile.SYMTYPE, linkname="sub"), member(t, "./d/x", b"through")),
        lambda t: (member(t, "./d", type=tarfile.SYMTYPE, linkname="sub"), member(t, "./d", b"replace")),
        # a hard link to a symlink is a symlink (GNU tar links the symlink itself): no writing through it,
        lambda t: (
            member(t, "./s", type=tarfile.SYMTYPE, linkname="sub"),
            member(t, "./h", type=tarfile.LNKTYPE, linkname="./s"),
            member(t, "./h/x", b"through"),
        ),
        # and its relative target may leave the tree from its new place
        lambda t: (
            member(t, "./a/", type=tarfile.DIRTYPE),
            member(t, "./a/l", type=tarfile.SYMTYPE, linkname="../x"),
            member(t, "./h", type=tarfile.LNKTYPE, linkname="./a/l"),
        ),
    ],
)
def test_unsafe_members_are_refused_before_reaching_the_sink(add: Callable[[tarfile.TarFile], None]) -> None:
    def full(tar: tarfile.TarFile) -> None:
        member(tar, "./before.txt", b"ok")
        add(tar)

    stream = build(full)
    src = io.BytesIO(stream)
    sunk: list[bytes] = []
    with pytest.raises(ScriptError) as err:
        gate(lambda n: src.read(n), lambda v: sunk.append(bytes(v)), MemberPolicy("/workspace"))
    assert err.value.code == "unsafe_archive"
    # the refused header never reached tar: the sink holds (a prefix of) the approved members only
    names = [m[0] for m in _members(b"".join(sunk) + bytes(1024))]
    assert names == [".", "./before.txt"][: len(names)]


def test_external_symlink_allowed_when_asked_but_never_traversed() -> None:
    ext = build(lambda t: member(t, "./python", type=tarfile.SYMTYPE, linkname="/usr/bin/python3"))
    assert _members(run_gate(ext, allow_external=True)) == _members(ext)
    with pytest.raises(ScriptError):
        run_gate(ext)
    through = build(
        lambda t: (member(t, "./etc", type=tarfile.SYMTYPE, linkname="/etc"), member(t, "./etc/passwd", b"x"))
    )
    with pytest.raises(ScriptError):
        run_gate(through, allow_external=True)


def test_trailing_garbage_after_end_marker_is_refused() -> None:
    stream = build(lambda t: member(t, "./a", b"a"))
    with pytest.raises(ScriptError):
        run_gate(stream + b"\x01" * 512)
    assert _members(run_gate(stream + b"\0" * 4096)) == _members(stream)


def test_non_regular_member_with_data_is_refused() -> None:
    clean = build(lambda t: member(t, "./d", type=tarfile.DIRTYPE))
    # a directory header with a size (tarfile writes it and the data): tar and tarfile would disagree
    hdr = tarfile.TarInfo("./d")
    hdr.type, hdr.size = tarfile.DIRTYPE, 512
    forged = build(lambda t: t.addfile(hdr, io.BytesIO(b"\0" * 512)))
    with pytest.raises(ScriptError):
        run_gate(forged)
    assert _members(run_gate(clean)) == _members(clean)


def test_garbage_stream_is_unsafe() -> None:
    with pytest.raises(ScriptError) as err:
        run_gate(os.urandom(4096))
    assert err.value.code == "unsafe_archive"


def test_gate_over_recycled_part_buffers_with_tiny_parts() -> None:
    """PartStream recycles part buffers; with parts far smaller than tarfile's reads, the bytes that
    reach tar must still be exactly the archive (no view may outlive its buffer)."""
    from gs_fetch import PartStream

    def add(tar: tarfile.TarFile) -> None:
        for i in range(120):  # ~5 MiB: several times PartStream.HOLD_BYTES
            member(tar, "./f%03d" % i, os.urandom(3000 + 733 * i))

    stream = build(add)
    parts = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    class FakeFetcher:
        ctx = type("C", (), {"check": staticmethod(lambda: None)})()

        def __init__(self) -> None:
            self.i, self.pool, self.released = 0, [], 0

        def next(self):  # type: ignore[no-untyped-def]
            if self.i == len(parts):
                return None
            buf = self.pool.pop() if self.pool else bytearray(4097)
            buf[: len(parts[self.i])] = parts[self.i]
            view = memoryview(buf)[: len(parts[self.i])]
            self.i += 1
            return buf, view

        def release(self, buf: bytearray) -> None:
            buf[:] = b"\xee" * len(buf)  # scribble: any stale view would now read garbage
            self.pool.append(buf)
            self.released += 1

    fetcher = FakeFetcher()
    reader = PartStream(fetcher, lambda n: None)  # type: ignore[arg-type]
    out: list[bytes] = []
    gate(reader.read, lambda v: out.append(bytes(v)), MemberPolicy("/workspace"))
    assert _members(b"".join(out)) == _members(stream) and fetcher.released > 10


def test_the_gates_own_output_is_a_form_it_accepts_unchanged() -> None:
    """The headers the gate writes are within the forms it reads: gating twice changes nothing."""
    stream = build(lambda t: [add(t) for add in SAFE_MEMBERS])
    once = run_gate(stream)
    assert run_gate(once) == once


def test_an_archive_made_by_tarfile_add_passes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """tarfile fills owner names and writes hdrcharset=BINARY for non-UTF-8 names: inert, accepted."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data")
    open(os.path.join(os.fsencode(src), b"latin-\xe9"), "wb").close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(src), arcname=".")
    assert sorted(m[0] for m in _members(run_gate(buf.getvalue()))) == sorted(m[0] for m in _members(buf.getvalue()))


def test_members_passed_on_as_read_are_exactly_what_the_gate_would_write(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The gate hands on a member's header bytes as read only where they equal its own encoding
    (gs_tarheader.encode_as_read); with that shortcut off, every byte of the output is the same.
    Streams: GNU tar with the snapshot writer's options over a tree with every kind of member, and
    tarfile's pax streams (other records, integer mtimes, big ids, long names)."""
    import subprocess

    import gs_tarsafe
    from snapshot import tar_command

    ws = tmp_path / "ws"
    (ws / "d" / "deeper").mkdir(parents=True)
    for i in range(30):
        (ws / "d" / ("f%02d" % i)).write_bytes(os.urandom(i * 37))
    (ws / "whole-seconds").write_bytes(b"w")
    os.utime(ws / "whole-seconds", (1_600_000_000, 1_600_000_000))
    (ws / "setuid").write_bytes(b"s")
    os.chmod(ws / "setuid", 0o4755)
    (ws / ("n" * 120)).write_bytes(b"long name")
    (ws / "d" / "deeper" / "link").symlink_to("../f01")
    (ws / "far").symlink_to("d/deeper/" + "t" * 150)
    os.link(ws / "d" / "f02", ws / "hard")
    with open(ws / "sparse", "wb") as fh:
        fh.seek(1 << 20)
        fh.write(b"end")
    writer = [a for a in tar_command(str(ws), [], 0) if a != "--verbose" and not a.startswith("--index-file")]
    gnu = subprocess.run(writer, capture_output=True, check=True).stdout
    tarfile_made = build(lambda t: [add(t) for add in SAFE_MEMBERS])

    used = []
    real = gs_tarsafe.encode_as_read

    def counting(*args):  # type: ignore[no-untyped-def]
        header = real(*args)
        used.append(header is not None)
        return header

    for stream in (gnu, tarfile_made):
        used.clear()
        monkeypatch.setattr(gs_tarsafe, "encode_as_read", counting)
        shortcut = run_gate(stream)
        taken = sum(used)
        monkeypatch.setattr(gs_tarsafe, "encode_as_read", lambda *a: None)
        assert run_gate(stream) == shortcut
        if stream is gnu:  # the shortcut is what ran for most members, so the comparison means something
            assert taken >= 30 and taken < len(used), (taken, len(used))
