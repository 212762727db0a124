"""gs_chunker: the chunks always concatenate to the exact stream, and a small change to a tree changes
only a few chunks of the stream real GNU tar writes for it (with snapshot.py's exact options)."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from tests.support.trees import MTIME, make_tricky_tree

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "remote_scripts"))

from gs_chunker import Chunker, chunk_bytes, cut_here  # noqa: E402
from snapshot import tar_command  # noqa: E402

SMALL = {"block_size": 64 * 1024, "large_min": 16 * 1024, "group_max": 64 * 1024, "modulus": 8}


def tar_stream(root: pathlib.Path) -> bytes:
    cmd = [a for a in tar_command(str(root), [], 0) if a != "--verbose" and not a.startswith("--index-file")]
    return subprocess.run(cmd, stdout=subprocess.PIPE, check=True, env=dict(os.environ, LC_ALL="C")).stdout


def kinds(data: bytes, **kw: int) -> list[str]:
    take = lambda kind: bytearray(kw["block_size"] if kind == "block" else kw["group_max"])  # noqa: E731
    return [k for k, _, _ in Chunker(io.BytesIO(data), take, **kw)]


@pytest.mark.parametrize("params", [{}, SMALL, {"block_size": 512, "large_min": 512, "group_max": 4096, "modulus": 1}])
def test_chunks_concatenate_to_the_tar_stream_of_a_tricky_tree(tmp_path: pathlib.Path, params: dict[str, int]) -> None:
    root = make_tricky_tree(tmp_path / "w", big_bytes=5 << 20)
    (root / ("long" * 40)).write_bytes(os.urandom(20_000))  # a pax path record
    with open(root / "sparse_big", "wb") as fh:  # sparse with a large data region (sparse 0.0 pax map)
        for at in range(0, 8 << 20, 1 << 20):
            fh.seek(at)
            fh.write(os.urandom(100_000))
    data = tar_stream(root)
    chunks = chunk_bytes(data, **params)
    assert b"".join(chunks) == data
    assert all(chunks)
    cap = params.get("group_max", 4 << 20)
    assert max(len(c) for c in chunks) <= max(cap, params.get("block_size", 16 << 20))


def test_large_members_are_cut_in_blocks_aligned_to_their_data(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    payload = os.urandom(200_000)
    (root / "big").write_bytes(payload)
    data = tar_stream(root)
    chunks = chunk_bytes(data, **SMALL)
    ks = kinds(data, **SMALL)
    blocks = [c for c, k in zip(chunks, ks) if k == "block"]
    assert b"".join(blocks)[: len(payload)] == payload  # blocks are exactly the data region (+ padding)
    assert [len(b) for b in blocks] == [65536, 65536, 65536, 200_000 - 3 * 65536 + 192]
    assert ks[0] == "group" and ks[-1] == "group"  # headers before, end-of-archive after


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_foreign_streams_and_garbage_still_round_trip(fmt: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(30):
            name = ("d%d/" % (i % 3)) + ("n" * (120 if fmt != tarfile.USTAR_FORMAT else 10)) + str(i)
            body = os.urandom(i * 3000)
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    assert b"".join(chunk_bytes(data, **SMALL)) == data
    junk = os.urandom(300_000)
    assert b"".join(chunk_bytes(junk, **SMALL)) == junk
    truncated = data[: len(data) // 2 + 7]
    assert b"".join(chunk_bytes(truncated, **SMALL)) == truncated


def build(root: pathlib.Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "models" / "w.bin").write_bytes(os.urandom(700_000))
    for d in range(4):
        (root / "pkg" / ("sub%d" % d)).mkdir(parents=True)
        for i in range(60):
            (root / "pkg" / ("sub%d" % d) / ("f%03d.py" % i)).write_bytes(os.urandom(300 + i * 7))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME))
    os.utime(root, (MTIME, MTIME))


def changed(before: bytes, after: bytes) -> set[bytes]:
    return set(chunk_bytes(after, **SMALL)) - set(chunk_bytes(before, **SMALL))


# A rename is a deletion plus an addition, and both parent directories' mtimes change.
@pytest.mark.parametrize("change,limit", [("append", 3), ("touch", 1), ("new_file", 3), ("delete", 2), ("rename", 5)])
def test_a_small_change_changes_only_a_few_chunks(tmp_path: pathlib.Path, change: str, limit: int) -> None:
    root = tmp_path / "w"
    build(root)
    before = tar_stream(root)
    total = len(chunk_bytes(before, **SMALL))
    assert total >= 30  # enough chunks for "a few" to mean something
    sub = root / "pkg" / "sub2"
    if change == "append":
        with open(root / "models" / "w.bin", "ab") as fh:
            fh.write(os.urandom(5000))
    elif change == "touch":
        os.utime(sub / "f010.py", (MTIME + 5, MTIME + 5))
    elif change == "new_file":
        (sub / "new.py").write_bytes(b"x = 1\n")
    elif change == "delete":
        (sub / "f020.py").unlink()
    elif change == "rename":
        (sub / "f030.py").rename(root / "pkg" / "sub0" / "moved.py")
    after = tar_stream(root)
    assert after != before
    count = len(changed(before, after))
    assert 1 <= count <= limit, "%d of %d chunks changed" % (count, total)


def test_cut_rule_is_the_documented_hash_residue() -> None:
    import hashlib

    for name in (b"./a", b"./pkg/sub1/f001.py", b"./" + b"x" * 300):
        expect = int.from_bytes(hashlib.sha1(name).digest()[:8], "big") % 64 == 0
        assert cut_here(name, 64) is expect
