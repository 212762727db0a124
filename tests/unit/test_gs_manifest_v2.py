"""Manifest v2 (gs_manifest.build_v2/validate) and pack objects (gs_packer): what restore trusts is
checked strictly, and v1 manifests still validate."""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "remote_scripts"))

from gs_common import ScriptError  # noqa: E402
from gs_manifest import build_v2, validate  # noqa: E402
from gs_packer import Loc, PackBuilder, parse_toc, seal  # noqa: E402


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample() -> dict[str, Any]:
    block = b"B" * 1000
    g1, g2 = b"group one", b"group two!"
    builder = PackBuilder(pack_size=1 << 20, chunk_max=4096)
    loc1, _ = builder.add(h(g1), g1, len(g1), "none", h(g1))
    loc2, _ = builder.add(h(g2), g2, len(g2), "none", h(g2))
    sealed = builder.flush()
    assert sealed is not None and loc1.key == loc2.key == sealed[0]
    bloc = Loc("chunks/" + h(block), 0, len(block), len(block), "none", h(block), len(block), h(block))
    entries = [
        (h(g1), len(g1), loc1, "group", True),
        (h(block), len(block), bloc, "block", True),
        (h(g2), len(g2), loc2, "group", True),
        (h(block), len(block), bloc, "block", False),
    ]
    doc = build_v2(
        cfg={"snapshot_id": "s1"},
        codec="zstd",
        chunking={"block_size": 1 << 24},
        entries=entries,
        files=3,
        bytes_uploaded=sealed[4] + len(block),
        source={},
        created_at="t",
        timings={},
    )
    return json.loads(json.dumps(doc))


def test_a_built_manifest_validates_and_adds_up() -> None:
    doc = validate(sample())
    assert doc["version"] == 2 and len(doc["objects"]) == 2 and len(doc["chunks"]) == 4
    t = doc["totals"]
    assert (t["chunks"], t["chunks_new"], t["chunks_reused"], t["objects"]) == (4, 3, 1, 2)
    assert t["raw_bytes"] == 9 + 1000 + 10 + 1000


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target = doc
        parts = path.split(".")
        for p in parts[:-1]:
            target = target[int(p)] if p.isdigit() else target[p]
        target[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value

    return apply


def _huge_raw(d: dict[str, Any]) -> None:
    """A consistent manifest but for one chunk claiming 1 TiB of raw bytes (restore sizes buffers by it)."""
    c = next(c for c in d["chunks"] if c["kind"] == "group")
    d["totals"]["raw_bytes"] += (1 << 40) - c["raw_size"]
    c.update(codec="zstd", raw_size=1 << 40)


def _huge_object(d: dict[str, Any]) -> None:
    o = next(o for o in d["objects"] if o["key"].startswith("packs/"))
    d["totals"]["stored_bytes"] += (1 << 40) - o["size"]
    o["size"] = 1 << 40


@pytest.mark.parametrize(
    "damage",
    [
        _set("objects.0.key", "../../etc/passwd"),
        _set("objects.0.key", "chunks/" + "A" * 64),
        _set("objects.1.key", "packs/" + "0" * 64),  # a pack not named by its digest
        _set("chunks.0.object", 7),
        _set("chunks.0.offset", 10**9),
        _set("chunks.1.stored_size", 999),  # a block chunk must fill its object
        _set("chunks.0.codec", "gzip"),
        _set("chunks.0.kind", "part"),
        _set("chunks.0.new", "yes"),
        _set("chunks.0.raw_size", 3),  # raw chunk with stored != raw
        _set("totals.raw_bytes", 1),
        _set("totals.stored_bytes", 1),
        _set("totals.chunks_new", 4),
        _set("chunks", []),
        _set("chunking", None),
        _huge_raw,
        _huge_object,
    ],
)
def test_damaged_manifests_are_manifest_invalid(damage: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(sample())
    damage(doc)
    with pytest.raises(ScriptError) as err:
        validate(doc)
    assert err.value.code == "manifest_invalid"


def test_listed_twice_or_unused_objects_are_refused() -> None:
    doc = sample()
    doc["objects"].append(dict(doc["objects"][0]))
    with pytest.raises(ScriptError, match="twice"):
        validate(doc)
    doc = sample()
    extra = b"unused"
    doc["objects"].append({"key": "chunks/" + h(extra), "size": 6, "sha256": h(extra)})
    doc["totals"]["objects"] += 1
    doc["totals"]["stored_bytes"] += 6
    with pytest.raises(ScriptError, match="no chunk uses"):
        validate(doc)


def test_v1_manifests_still_validate() -> None:
    data = b"x" * 10
    doc = {
        "format": "gpusnap-manifest",
        "version": 1,
        "codec": "none",
        "part_size": 10,
        "parts": [
            {
                "index": 0,
                "key": "part-00000",
                "codec": "none",
                "raw_size": 10,
                "stored_size": 10,
                "sha256": h(data),
                "raw_sha256": h(data),
            }
        ],
        "totals": {"raw_bytes": 10, "stored_bytes": 10, "parts": 1, "files": 1},
    }
    assert validate(doc) is doc
    doc["version"] = 3
    with pytest.raises(ScriptError):
        validate(doc)


def test_pack_toc_round_trip_and_damage() -> None:
    buf = bytearray(b"abcdefghij" + bytes(100))
    toc = [[h(b"abc"), 0, 3, 3, "none", h(b"abc")], [h(b"defghij"), 3, 7, 7, "none", h(b"defghij")]]
    view, digest = seal(buf, 10, toc)
    obj = bytes(view)
    assert digest == h(obj) and obj.endswith(b"GSPACK01")
    rows = parse_toc(obj)
    assert [(r["offset"], r["stored_size"]) for r in rows] == [(0, 3), (3, 7)]
    for bad in (obj[:-1], obj[:-16] + (10**6).to_bytes(8, "big") + b"GSPACK01", b"x" * 20):
        with pytest.raises(ScriptError) as err:
            parse_toc(bad)
        assert err.value.code == "part_corrupt"


def test_pack_builder_seals_when_full_and_names_every_chunk() -> None:
    builder = PackBuilder(pack_size=100, chunk_max=64)
    sealed = []
    locs = []
    for i in range(10):
        data = bytes([i]) * 30
        loc, s = builder.add(h(data), data, 30, "none", h(data))
        locs.append(loc)
        if s is not None:
            sealed.append(s)
    last = builder.flush()
    assert last is not None
    keys = {s[0] for s in sealed} | {last[0]}
    assert len(sealed) == 2 and all(loc.key in keys for loc in locs)
    for s in sealed:
        rows = parse_toc(s[1])
        assert "packs/" + h(bytes(s[1])) == s[0] and len(rows) == 4


def test_a_run_is_sealed_before_a_block_would_overflow_it_and_its_metadata_names_its_blocks() -> None:
    runs = PackBuilder(pack_size=100, chunk_max=50, runs=True)
    blocks = [bytes([i]) * 50 for i in range(5)]
    sealed = [s for s in (runs.add(h(b), b, 50, "none", h(b))[1] for b in blocks) if s is not None]
    last = runs.flush()
    assert last is not None
    sealed.append(last)
    # two full blocks per run, never three: a run stays within pack_size (+ its TOC)
    assert [len(parse_toc(s[1])) for s in sealed] == [2, 2, 1]
    for key, view, _buf, _locs, size, meta in sealed:
        rows = parse_toc(view)
        assert meta["blocks"] == ",".join(r["raw_sha256"] for r in rows) and meta["sha256"] == key[6:]
        assert sum(r["stored_size"] for r in rows) <= 100 and size == len(view)
    groups = PackBuilder(pack_size=100, chunk_max=50)  # a group pack fills past pack_size; no block list
    for b in blocks[:3]:
        _, s = groups.add(h(b), b, 50, "none", h(b))
    assert s is None and "blocks" not in groups.flush()[5]  # type: ignore[index]


def test_a_run_holds_at_most_run_blocks_blocks() -> None:
    from gs_packer import RUN_BLOCKS

    runs = PackBuilder(pack_size=1 << 20, chunk_max=64, runs=True)
    tiny = [("%04d" % i).encode() for i in range(RUN_BLOCKS + 3)]  # compressible blocks: small stored
    sealed = [s for s in (runs.add(h(b), b, len(b), "none", h(b))[1] for b in tiny) if s is not None]
    assert len(sealed) == 1 and len(parse_toc(sealed[0][1])) == RUN_BLOCKS
    assert len(sealed[0][5]["blocks"]) == RUN_BLOCKS * 65 - 1  # fits S3's 2 KiB of user metadata
