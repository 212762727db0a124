"""Format 2 under attack (an outside tester's findings): objects in the machine's chunk store that
vouch for a chunk digest they do not hold. Real snapshot.py/restore.py, SeaweedFS, GNU tar, s5cmd."""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import pytest
import zstandard

from src.pack import PackEntry, build_pack
from tests.integration.test_remote_dedup import Store, check_restore
from tests.support.fixtures_s3 import tree_state

pytestmark = pytest.mark.slow

BLOCK = 256 * 1024  # test_remote_dedup.SMALL's block size: a file of exactly this size is one block


def test_a_planted_block_that_decodes_to_other_bytes_is_never_restored_silently(
        tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any) -> None:
    """A previous (hostile) host of the machine, or anyone with write on its prefix, plants
    `chunks/<digest of a block it can predict>` (a public model's 16 MiB block) holding zstd of other
    bytes of the same size, with metadata that vouches for it. The next snapshot's resume check reuses
    it from the metadata (HEAD); its stored SHA-256 is self-consistent and the zstd frame checksum
    covers what the frame holds, so only the chunk's raw SHA-256 can tell. A restore must either give
    the real bytes back or fail with an integrity code, never write the planted bytes."""
    src = tmp_path / "src"
    src.mkdir()
    public = hashlib.sha256(b"public weights").digest() * (BLOCK // 32)  # exactly one block, no tar padding
    (src / "weights.bin").write_bytes(public)
    store = Store(s3_server, s3_client, s3_prefix)
    evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(BLOCK))
    raw = hashlib.sha256(public).hexdigest()
    s3_client.put_object(Bucket=s3_server.bucket, Key=store.store + "chunks/" + raw, Body=evil, Metadata={
        "sha256": hashlib.sha256(evil).hexdigest(), "raw-sha256": raw, "raw-size": str(BLOCK),
        "stored-size": str(len(evil)), "codec": "zstd"})
    res = store.snapshot(str(src))
    assert any(c["raw_sha256"] == raw for c in res["manifest"]["chunks"])  # the planted digest is the block's
    target = tmp_path / "restored"
    run = store.restore(res, str(target))
    if run.returncode == 0:
        assert tree_state(str(target)) == tree_state(str(src))
    else:
        assert run.error_code == "part_corrupt", run.events[-1]


def _plant_block(s3_server: Any, s3_client: Any, store: Store, raw: str, size: int) -> None:
    """`chunks/<raw>` holding zstd of other bytes of `size`, its metadata vouching for `raw`."""
    evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(size))
    s3_client.put_object(Bucket=s3_server.bucket, Key=store.store + "chunks/" + raw, Body=evil, Metadata={
        "sha256": hashlib.sha256(evil).hexdigest(), "raw-sha256": raw, "raw-size": str(size),
        "stored-size": str(len(evil)), "codec": "zstd"})


def test_the_next_snapshot_does_not_adopt_planted_blocks_or_packs_whose_toc_lies(
        tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any) -> None:
    """Planted objects that vouch for chunk digests (block metadata, a pack TOC named by its own
    SHA-256 with self-consistent slice digests) are not reused by the resume check: the snapshot stores
    the real chunks and restores byte-identical. Otherwise the snapshot completes, hibernate's light
    verify passes, the host is destroyed, and only the restore finds out (part_corrupt)."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "weights.bin").write_bytes(hashlib.sha256(b"public").digest() * (BLOCK // 32))
    for i in range(30):
        (src / "pkg" / ("f%02d.txt" % i)).write_text("line %d\n" % i * 300)
    probe = Store(s3_server, s3_client, s3_prefix + "probe/")  # what the attacker predicts: the chunk digests
    chunks = probe.snapshot(str(src))["manifest"]["chunks"]
    store = Store(s3_server, s3_client, s3_prefix)
    entries = []
    for c in chunks:
        if c["kind"] == "block":
            _plant_block(s3_server, s3_client, store, c["raw_sha256"], c["raw_size"])
        else:
            evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(c["raw_size"]))
            entries.append((PackEntry(raw_sha256=c["raw_sha256"], offset=0, stored_size=len(evil),
                                      raw_size=c["raw_size"], codec="zstd",
                                      sha256=hashlib.sha256(evil).hexdigest()), evil))
    assert entries and len(entries) < len(chunks)
    body, _ = build_pack(entries)
    s3_client.put_object(Bucket=s3_server.bucket, Key=store.store + "packs/" + hashlib.sha256(body).hexdigest(),
                         Body=body)
    res = store.snapshot(str(src))
    assert res["resumed_chunks"] == 0 and res["resumed_packs"] == 1, res
    check_restore(store, res, src, tmp_path / "restored")
