"""Format 2 under attack (an outside tester's findings): objects in the machine's chunk store that
vouch for a chunk digest they do not hold. Real snapshot.py/restore.py, SeaweedFS, GNU tar, s5cmd."""

from __future__ import annotations

import copy
import hashlib
import json
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
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
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
    s3_client.put_object(
        Bucket=s3_server.bucket,
        Key=store.store + "chunks/" + raw,
        Body=evil,
        Metadata={
            "sha256": hashlib.sha256(evil).hexdigest(),
            "raw-sha256": raw,
            "raw-size": str(BLOCK),
            "stored-size": str(len(evil)),
            "codec": "zstd",
        },
    )
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
    s3_client.put_object(
        Bucket=s3_server.bucket,
        Key=store.store + "chunks/" + raw,
        Body=evil,
        Metadata={
            "sha256": hashlib.sha256(evil).hexdigest(),
            "raw-sha256": raw,
            "raw-size": str(size),
            "stored-size": str(len(evil)),
            "codec": "zstd",
        },
    )


def test_the_next_snapshot_does_not_adopt_planted_blocks_or_packs_whose_toc_lies(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
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
            entries.append(
                (
                    PackEntry(
                        raw_sha256=c["raw_sha256"],
                        offset=0,
                        stored_size=len(evil),
                        raw_size=c["raw_size"],
                        codec="zstd",
                        sha256=hashlib.sha256(evil).hexdigest(),
                    ),
                    evil,
                )
            )
    assert entries and len(entries) < len(chunks)
    body, _ = build_pack(entries)
    s3_client.put_object(
        Bucket=s3_server.bucket, Key=store.store + "packs/" + hashlib.sha256(body).hexdigest(), Body=body
    )
    res = store.snapshot(str(src))
    assert res["resumed_chunks"] == 0 and res["resumed_packs"] == 1, res
    check_restore(store, res, src, tmp_path / "restored")


DEFAULTS = {
    "block_size": 16 << 20,
    "large_min": 256 * 1024,
    "group_max": 4 << 20,
    "group_modulus": 64,
    "pack_size": 32 << 20,
}


def _edge_tree(root: pathlib.Path, case: str) -> None:
    root.mkdir()
    if case == "empty":
        return
    if case == "zero_byte":
        (root / "z").write_bytes(b"")
        return
    if case == "sizes":
        for name, size in (
            ("a_256k", 256 * 1024),
            ("b_256k_less1", 256 * 1024 - 1),
            ("c_16m", 16 << 20),
            ("d_16m_plus1", (16 << 20) + 1),
            ("e_32m_less512", (32 << 20) - 512),
        ):
            (root / name).write_bytes(os.urandom(size))
        return
    if case == "sparse_and_links":
        with open(root / "sparse.img", "wb") as fh:
            fh.seek(40 << 20)
            fh.write(b"tail")
            fh.seek(3 << 20)
            fh.write(os.urandom(300 * 1024))
        (root / "big").write_bytes(os.urandom((16 << 20) + 4096))
        os.link(root / "big", root / "big_link")
        os.link(root / "sparse.img", root / "sparse_link")
        return
    if case == "long_names":
        deep = root
        for i in range(12):  # a path far past ustar's 100+155 bytes: pax headers carry it
            deep = deep / ("d%02d_" % i + "x" * 60)
        deep.mkdir(parents=True)
        (deep / ("f" * 250)).write_bytes(os.urandom(300 * 1024))
        (deep / "small.txt").write_text("small")
        (root / "caf\u00e9 \u00fcmlaut \u2603.bin").write_bytes(os.urandom(270 * 1024))
        (root / b"\xff\xfe latin1 name".decode("utf-8", "surrogateescape")).write_bytes(b"bytes")
        os.symlink("x" * 200, root / "long_link")
        return
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty", "zero_byte", "sizes", "sparse_and_links", "long_names"])
def test_chunker_edge_trees_restore_identical_and_dedup_fully(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any, case: str
) -> None:
    """The design's real cut points (16 MiB blocks from 256 KiB): trees at and around every boundary,
    sparse files and hard links (tar's own sparse/link members), names that need pax headers. Each
    restores byte-identical, and a second snapshot of the unchanged tree uploads nothing."""
    src = tmp_path / "src"
    _edge_tree(src, case)
    store = Store(s3_server, s3_client, s3_prefix, **DEFAULTS)
    first = store.snapshot(str(src))
    check_restore(store, first, src, tmp_path / "r1")
    again = store.snapshot(str(src))
    assert again["chunks_new"] == 0 and again["bytes_uploaded"] == 0, again["manifest"]["chunks"]
    assert again["raw_bytes"] == first["raw_bytes"]
    check_restore(store, again, src, tmp_path / "r2")


def test_peak_memory_is_bounded_on_a_1_gib_file_and_50k_small_files(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """The issue's bound (peak RSS <= 1 GiB, no local disk) with the design's sizes: a 1 GiB file (64
    blocks) and 50,000 small files (many groups, several packs, a 50k-entry chunk list and manifest)."""
    import json
    import resource
    import subprocess
    import sys

    from tests.support.fixtures_s3 import REMOTE_SCRIPTS

    src = tmp_path / "src"
    (src / "small").mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(src / "weights.bin", "wb") as fh:
        for i in range(1024):
            fh.write(hashlib.sha256(b"%d" % i).digest() + block[32:])  # every MiB differs
    for d in range(50):
        sub = src / "small" / ("d%02d" % d)
        sub.mkdir()
        for i in range(1000):
            (sub / ("f%04d.txt" % i)).write_bytes(b"%d %d\n" % (d, i) * 20)
    store = Store(s3_server, s3_client, s3_prefix, **DEFAULTS)
    cfg = store.config(str(src))
    proc = subprocess.run(
        [sys.executable, str(REMOTE_SCRIPTS / "snapshot.py")],
        input=json.dumps(cfg).encode(),
        capture_output=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest reaped descendant
    res = json.loads(proc.stdout.decode().splitlines()[-1])
    assert res["files"] >= 50_000 and res["raw_bytes"] > (1 << 30)
    print("peak RSS of the largest child: %.0f MiB" % (peak_kib / 1024))
    assert peak_kib < (1 << 20), "peak RSS %d KiB" % peak_kib


def _rewrite_manifest(s3_server: Any, s3_client: Any, res: dict[str, Any], change: Any) -> dict[str, Any]:
    """Replace the snapshot's manifest by `change(doc)` (a hostile previous host writes what it likes);
    returns the snapshot result with the new manifest's digest, as the control plane would hold it."""
    doc = copy.deepcopy(res["manifest"])
    change(doc)
    body = json.dumps(doc).encode()
    s3_client.put_object(Bucket=s3_server.bucket, Key=res["manifest_key"], Body=body)
    return dict(res, manifest=doc, manifest_sha256=hashlib.sha256(body).hexdigest())


def _huge_raw(doc: dict[str, Any]) -> None:
    c = next(c for c in doc["chunks"] if c["codec"] == "zstd")
    doc["totals"]["raw_bytes"] += (8 << 30) - c["raw_size"]
    c["raw_size"] = 8 << 30  # under the disk check's bar; one decode buffer of this size per worker


def _huge_object(doc: dict[str, Any]) -> None:
    o = next(o for o in doc["objects"] if o["key"].startswith("packs/"))
    doc["totals"]["stored_bytes"] += (1 << 46) - o["size"]
    o["size"] = 1 << 46


@pytest.mark.parametrize("change", [_huge_raw, _huge_object])
def test_a_manifest_claiming_huge_sizes_is_manifest_invalid_before_any_allocation(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any, change: Any
) -> None:
    """Restore sizes its buffers from the manifest (the largest object and raw chunk it names). A
    manifest from a hostile previous host that names a 64 TiB chunk or object must be refused as
    `manifest_invalid` (no chunk or object of format 2 is ever larger than the chunking allows), not
    crash the new host's restore with MemoryError or an OOM kill."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(20):
        (src / "pkg" / ("f%02d.txt" % i)).write_text("line %d\n" % i * 300)
    store = Store(s3_server, s3_client, s3_prefix)
    res = _rewrite_manifest(s3_server, s3_client, store.snapshot(str(src)), change)
    target = tmp_path / "restored"
    run = store.restore(res, str(target))
    assert run.returncode != 0 and run.error_code == "manifest_invalid", (run.events[-1:], run.stderr[-2000:])


def test_resume_never_buffers_a_listed_object_bigger_than_this_run_could_have_written(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """The resume check downloads whole listed packs no known chunk points to (and, since they are
    checked by content, listed blocks). Anyone with write on the machine prefix can list a 50 GB
    `packs/<its digest>` there: the next snapshot would buffer it in memory (MemoryError or an OOM kill
    of the hibernate's snapshot, every time, until gc's grace passes). A pack larger than this run's
    packs can be (pack_size + a group + TOC, with margin) is skipped unread; here a truthful 4 MiB pack
    against the 512 KiB packs of the test chunking stands in for the 50 GB one."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(30):
        (src / "pkg" / ("f%02d.txt" % i)).write_text("line %d\n" % i * 300)
    chunks = Store(s3_server, s3_client, s3_prefix + "probe/").snapshot(str(src))["manifest"]["chunks"]
    store = Store(s3_server, s3_client, s3_prefix)
    filler = os.urandom(4 << 20)
    entries = [
        (
            PackEntry(
                raw_sha256=hashlib.sha256(filler).hexdigest(),
                offset=0,
                stored_size=len(filler),
                raw_size=len(filler),
                codec="none",
                sha256=hashlib.sha256(filler).hexdigest(),
            ),
            filler,
        )
    ]
    entries += [
        (
            PackEntry(
                raw_sha256=c["raw_sha256"],
                offset=0,
                stored_size=len(raw),
                raw_size=len(raw),
                codec="none",
                sha256=c["raw_sha256"],
            ),
            raw,
        )
        for c, raw in ((c, _group_bytes(s3_server, s3_client, s3_prefix + "probe/m1/", c)) for c in chunks)
    ]
    body, _ = build_pack(entries)
    s3_client.put_object(
        Bucket=s3_server.bucket, Key=store.store + "packs/" + hashlib.sha256(body).hexdigest(), Body=body
    )
    res = store.snapshot(str(src))
    assert res["resumed_packs"] == 0 and res["resumed_chunks"] == 0, res
    check_restore(store, res, src, tmp_path / "restored")


def _group_bytes(s3_server: Any, s3_client: Any, store: str, c: dict[str, Any]) -> bytes:
    """The raw bytes of a chunk of a probe snapshot (its pack fetched, its slice decoded)."""
    manifests = [
        o
        for o in s3_client.list_objects_v2(Bucket=s3_server.bucket, Prefix=store)["Contents"]
        if o["Key"].endswith("manifest.json")
    ]
    doc = json.loads(s3_client.get_object(Bucket=s3_server.bucket, Key=manifests[0]["Key"])["Body"].read())
    chunk = next(x for x in doc["chunks"] if x["raw_sha256"] == c["raw_sha256"])
    obj = doc["objects"][chunk["object"]]
    data = s3_client.get_object(Bucket=s3_server.bucket, Key=store + obj["key"])["Body"].read()
    stored = data[chunk["offset"] : chunk["offset"] + chunk["stored_size"]]
    return stored if chunk["codec"] == "none" else zstandard.ZstdDecompressor().decompress(stored)


def test_known_chunks_whose_objects_gc_deleted_are_stored_again(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """The control plane tells the host of chunks whose objects are gone (gc removed them, or someone
    did by hand): the host's listing drops those rows, stores the chunks again, and the snapshot
    restores byte-identical."""
    from tests.support.trees import make_tricky_tree

    src = make_tricky_tree(tmp_path / "src", big_bytes=1 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    first = store.snapshot(str(src))
    for obj in first["manifest"]["objects"]:
        s3_client.delete_object(Bucket=s3_server.bucket, Key=store.store + obj["key"])
    second = store.snapshot(str(src))  # told every chunk of the first
    assert second["known_dropped"] > 0 and second["chunks_reused"] < second["chunks"]
    check_restore(store, second, src, tmp_path / "r")


def test_a_reused_chunk_that_decodes_to_other_bytes_fails_the_restore(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """A hostile host of the machine replaces the block of a predictable file by zstd of other bytes of
    the same size and rewrites its own snapshot's manifest to match (so the control plane indexes the
    lie). The next, honest host is told that chunk (known_chunks) and reuses it. The restore of that
    snapshot must fail with part_corrupt, never write the other bytes: the frame checksum and the stored
    SHA-256 both match, only the raw digest tells."""
    src = tmp_path / "src"
    src.mkdir()
    public = hashlib.sha256(b"public weights").digest() * (BLOCK // 32)
    (src / "weights.bin").write_bytes(public)
    store = Store(s3_server, s3_client, s3_prefix)
    first = store.snapshot(str(src))
    raw = hashlib.sha256(public).hexdigest()
    evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(BLOCK))
    digest = hashlib.sha256(evil).hexdigest()
    body, (entry,) = build_pack([(PackEntry(raw, 0, len(evil), BLOCK, "zstd", digest), evil)])
    key = "packs/" + hashlib.sha256(body).hexdigest()  # a run holding the lie (the file is one block)
    s3_client.put_object(Bucket=s3_server.bucket, Key=store.store + key, Body=body)

    def lie(doc: dict[str, Any]) -> None:
        for c in doc["chunks"]:
            if c["raw_sha256"] == raw:
                c.update(codec="zstd", stored_size=len(evil), sha256=digest, offset=entry.offset)
                o = doc["objects"][c["object"]]
                doc["totals"]["stored_bytes"] += len(body) - o["size"]
                o.update(key=key, size=len(body), sha256=key[6:])

    store.manifests[-1] = _rewrite_manifest(s3_server, s3_client, first, lie)["manifest"]
    second = store.snapshot(str(src))
    reused = [c for c in second["manifest"]["chunks"] if c["raw_sha256"] == raw]
    assert reused and not any(c["new"] for c in reused) and reused[0]["sha256"] == digest
    target = tmp_path / "restored"
    run = store.restore(second, str(target))
    assert run.returncode != 0 and run.error_code == "part_corrupt", run.events[-1]


def test_a_planted_run_whose_metadata_and_toc_vouch_for_blocks_it_does_not_hold_is_not_adopted(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """A run (pack named by its SHA-256, metadata `blocks` naming predictable block digests, a TOC
    whose rows match their slices) holding zstd of other bytes: resume fetches it when a named block
    comes by, finds every row decodes to other bytes, and stores the real blocks."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(hashlib.sha256(b"public").digest() * (2 * BLOCK // 32))  # two blocks
    probe = Store(s3_server, s3_client, s3_prefix + "probe/")
    blocks = [c for c in probe.snapshot(str(src))["manifest"]["chunks"] if c["kind"] == "block"]
    assert len(blocks) == 2
    store = Store(s3_server, s3_client, s3_prefix)
    entries = []
    for c in blocks:
        evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(c["raw_size"]))
        sha = hashlib.sha256(evil).hexdigest()
        entries.append((PackEntry(c["raw_sha256"], 0, len(evil), c["raw_size"], "zstd", sha), evil))
    body, _ = build_pack(entries)
    other = zstandard.ZstdCompressor().compress(os.urandom(1000))  # names blocks no one needs
    unrelated, _ = build_pack(
        [(PackEntry("ab" * 32, 0, len(other), 1000, "zstd", hashlib.sha256(other).hexdigest()), other)]
    )
    for pack, names in ((body, [c["raw_sha256"] for c in blocks]), (unrelated, ["ab" * 32])):
        sha = hashlib.sha256(pack).hexdigest()
        s3_client.put_object(
            Bucket=s3_server.bucket,
            Key=store.store + "packs/" + sha,
            Body=pack,
            Metadata={"sha256": sha, "chunks": str(len(names)), "blocks": ",".join(names)},
        )
    res = store.snapshot(str(src))
    # both HEADed; only the run naming a block this snapshot needs is fetched (runs are read lazily)
    assert res["orphan_packs"] == 2 and res["resumed_packs"] == 1
    assert res["resumed_chunks"] == 0 and res["chunks_new"] >= 1, res
    check_restore(store, res, src, tmp_path / "restored")


def test_a_planted_pack_claiming_a_huge_raw_size_is_refused_before_any_allocation(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """A pack (group pack, and a run naming a block the snapshot needs) whose TOC rows claim 1 TiB of
    raw bytes for a zstd frame that states no content size: a decoder would allocate the claim first
    (MemoryError, or a host out of memory for a smaller lie). Resume refuses any claim larger than a
    chunk of this run before decoding, and the snapshot stores the real chunks."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "weights.bin").write_bytes(hashlib.sha256(b"public").digest() * (BLOCK // 32))
    for i in range(10):
        (src / "pkg" / ("f%02d.txt" % i)).write_text("line %d\n" % i * 300)
    probe = Store(s3_server, s3_client, s3_prefix + "probe/")
    chunks = probe.snapshot(str(src))["manifest"]["chunks"]
    store = Store(s3_server, s3_client, s3_prefix)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 4096)
    sha = hashlib.sha256(frame).hexdigest()
    block = next(c for c in chunks if c["kind"] == "block")
    group = next(c for c in chunks if c["kind"] == "group")
    for raw, metadata in ((group["raw_sha256"], {}), (block["raw_sha256"], {"blocks": block["raw_sha256"]})):
        body, _ = build_pack([(PackEntry(raw, 0, len(frame), 1 << 40, "zstd", sha), frame)])
        pack_sha = hashlib.sha256(body).hexdigest()
        s3_client.put_object(
            Bucket=s3_server.bucket,
            Key=store.store + "packs/" + pack_sha,
            Body=body,
            Metadata={"sha256": pack_sha, "chunks": "1", **metadata},
        )
    res = store.snapshot(str(src))
    assert res["orphan_packs"] == 2 and res["resumed_chunks"] == 0, res
    check_restore(store, res, src, tmp_path / "restored")
