"""src/manifest.py reads format-2 manifests as strictly as the host's validator (gs_manifest.validate_v2):
a manifest that could point a restore at another object, or whose numbers do not add up, is refused."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from src.errors import JobFailed
from src.manifest import parse_manifest
from src.pack import PackEntry, build_pack, read_toc
from src.settings import Settings, SettingsError
from tests.fakes.fake_object_store import FakeObjectStore
from tests.support.chunkstore import write_v2


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def doc() -> dict:
    store = FakeObjectStore()
    raw = write_v2(store, "snapshots/m1/", "snap_a", blocks=[b"B" * 1000, b"B" * 1000], groups=[b"g1", b"g2"])
    return json.loads(raw)


def _drop_blocks(d: dict) -> None:
    d["chunks"] = [dict(c, object=c["object"]) for c in d["chunks"] if c["kind"] != "block"]
    t = d["totals"]
    t.update(
        chunks=len(d["chunks"]),
        chunks_new=sum(c["new"] for c in d["chunks"]),
        chunks_reused=sum(not c["new"] for c in d["chunks"]),
        raw_bytes=sum(c["raw_size"] for c in d["chunks"]),
    )


def _parse(doc: dict):  # type: ignore[no-untyped-def]
    return parse_manifest(json.dumps(doc).encode())


def test_a_well_formed_v2_manifest_parses_with_its_objects_chunks_and_totals(doc):
    m = _parse(doc)
    assert m.version == 2 and m.snapshot_id == "snap_a"
    assert [o.kind for o in m.objects] == ["block", "pack"]
    assert len(m.chunks) == 4 and m.totals["chunks_new"] == 3 and m.totals["chunks_reused"] == 1
    assert m.raw_bytes == 2004 and m.stored_bytes == sum(o.size for o in m.objects)


def _huge_raw(d: dict) -> None:
    """A consistent manifest but for one chunk claiming 1 TiB of raw bytes (restore sizes buffers by it)."""
    c = next(c for c in d["chunks"] if c["kind"] == "group")
    d["totals"]["raw_bytes"] += (1 << 40) - c["raw_size"]
    c.update(codec="zstd", raw_size=1 << 40)


def _huge_object(d: dict) -> None:
    o = next(o for o in d["objects"] if o["key"].startswith("packs/"))
    d["totals"]["stored_bytes"] += (1 << 40) - o["size"]
    o["size"] = 1 << 40


@pytest.mark.parametrize(
    "breaks",
    [
        lambda d: d["objects"][0].update(key="../other/chunks/" + "a" * 64),
        lambda d: d["objects"][0].update(key="chunks/" + "A" * 64),
        lambda d: d["objects"][1].update(key="packs/" + "0" * 64),  # a pack not named by its digest
        lambda d: d["objects"].append(dict(d["objects"][0])),  # listed twice
        lambda d: d["chunks"][0].update(object=7),
        lambda d: d["chunks"][2].update(offset=10**9),  # outside its pack
        lambda d: d["chunks"][0].update(offset=1),  # a block is its whole object
        lambda d: d["chunks"][0].update(codec="lz4"),
        lambda d: d["chunks"][0].update(kind="file"),
        lambda d: d["chunks"][0].update(new="yes"),
        lambda d: d["chunks"][2].update(sha256="f" * 64),  # raw chunk whose stored digest is not its raw digest
        lambda d: d["totals"].update(raw_bytes=1),
        lambda d: d["totals"].update(chunks_new=0),
        lambda d: d["totals"].update(objects=9),
        lambda d: d.update(chunks=[]),
        lambda d: d.pop("chunking"),
        _huge_raw,
        _huge_object,
        lambda d: _drop_blocks(d),  # the block object is listed but no chunk uses it
    ],
)
def test_a_manifest_that_breaks_a_rule_is_manifest_invalid(doc, breaks):
    bad = copy.deepcopy(doc)
    breaks(bad)
    with pytest.raises(JobFailed) as e:
        _parse(bad)
    assert e.value.code == "manifest_invalid"


def test_version_1_still_parses_and_other_versions_do_not():
    from tests.support.snapshots import write_snapshot_objects

    raw = write_snapshot_objects(FakeObjectStore(), "p/snap_b/", snapshot_id="snap_b", parts=2)
    assert parse_manifest(raw).version == 1 and len(parse_manifest(raw).parts) == 2
    with pytest.raises(JobFailed):
        parse_manifest(json.dumps({"format": "gpusnap-manifest", "version": 3}).encode())


def test_pack_round_trip():
    chunks = [(PackEntry(_sha(d), 0, len(d), len(d), "none", _sha(d)), d) for d in (b"one", b"two!", b"")]
    pack, entries = build_pack(chunks)
    assert read_toc(pack) == entries and [e.offset for e in entries] == [0, 3, 7]
    assert pack[entries[1].offset : entries[1].offset + 4] == b"two!"
    with pytest.raises(ValueError):
        read_toc(pack[:-1])


def test_snapshot_format_and_gc_grace_settings():
    assert Settings.from_env({}, dotenv=False).snapshot_format == 2
    assert Settings.from_env({"SNAPSHOT_FORMAT": "1"}, dotenv=False).snapshot_format == 1
    assert Settings.from_env({"GC_GRACE_S": "0"}, dotenv=False).gc_grace_s == 0
    assert Settings.from_env({}, dotenv=False).gc_grace_s == 3600
    for env in ({"SNAPSHOT_FORMAT": "3"}, {"GC_GRACE_S": "-1"}, {"GC_GRACE_S": "soon"}):
        with pytest.raises(SettingsError):
            Settings.from_env(env, dotenv=False)
