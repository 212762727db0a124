"""gs_fetch2.ChunkFetcher against an in-memory bucket: chunks come out in order and verified, an object
used again soon is fetched once, one used again much later is fetched again, object buffers stay
bounded, and damage maps to part_missing / part_truncated / part_corrupt."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "remote_scripts"))

from gs_codecs import for_restore  # noqa: E402
from gs_common import Context, Events, ScriptError  # noqa: E402
from gs_fetch2 import ChunkFetcher  # noqa: E402
from gs_manifest import build_v2, validate  # noqa: E402
from gs_packer import Loc, PackBuilder  # noqa: E402
from gs_s3 import NotFound  # noqa: E402


class DictStore:
    """The part of gs_s3.S5 ChunkFetcher uses, over a dict. cat_into as the real one: NotFound for an
    absent key, at most expected + 1 bytes copied, the count returned (short only when the object is)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    def cat_into(self, key: str, buf: bytearray, expected: int, fallback: str = "download_failed") -> int:
        if key not in self.objects:
            raise NotFound(key)
        self.gets.append(key)
        data = self.objects[key][: expected + 1]
        buf[: len(data)] = data
        return len(data)


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make(order: list[tuple[str, int]], run_size: int = 0) -> tuple[dict[str, Any], dict[str, bytes], list[bytes]]:
    """A v2 manifest over objects in a dict: ("g", i) = group i (all in one pack), ("b", i) = block i:
    its own object `chunks/<raw>` (the first writer's layout) or, with `run_size`, in runs of blocks
    of up to that many bytes (today's writer)."""
    builder = PackBuilder(pack_size=1 << 20, chunk_max=1 << 16)
    runs = PackBuilder(pack_size=run_size, chunk_max=1 << 16, runs=True)
    groups = [os.urandom(100 + i) for i in range(4)]
    blocks = [os.urandom(5000 + i) for i in range(50)]
    group_locs = [builder.add(h(g), g, len(g), "none", h(g))[0] for g in groups]
    key, view, _buf, _locs, _size, _meta = builder.flush()  # type: ignore[misc]
    objects = {key: bytes(view)}
    entries, stream = [], []
    for kind, i in order:
        if kind == "g":
            entries.append((h(groups[i]), len(groups[i]), group_locs[i], "group", True))
            stream.append(groups[i])
        elif run_size:
            data = blocks[i]
            loc, sealed = runs.add(h(data), data, len(data), "none", h(data))
            if sealed is not None:
                objects[sealed[0]] = bytes(sealed[1])
            entries.append((h(data), len(data), loc, "block", True))
            stream.append(data)
        else:
            data = blocks[i]
            loc = Loc("chunks/" + h(data), 0, len(data), len(data), "none", h(data), len(data), h(data))
            objects[loc.key] = data  # type: ignore[index]
            entries.append((h(data), len(data), loc, "block", True))
            stream.append(data)
    last = runs.flush()
    if last is not None:
        objects[last[0]] = bytes(last[1])
    return manifest_of(entries, "none"), objects, stream


def manifest_of(entries: list[Any], codec: str) -> dict[str, Any]:
    """A validated v2 manifest over these (raw digest, size, Loc, kind, new) entries."""
    doc = build_v2(
        cfg={},
        codec=codec,
        chunking={},
        entries=entries,
        files=1,
        bytes_uploaded=0,
        source={},
        created_at="t",
        timings={},
    )
    return validate(json.loads(json.dumps(doc)))


class Counting(ChunkFetcher):
    allocated = 0

    def _take(self, free: list[bytearray], size: int) -> bytearray:
        if free in self._obj_free.values() and not free:
            Counting.allocated += 1
        return super()._take(free, size)


def drain(manifest: dict[str, Any], store: DictStore, window: int = 2) -> list[bytes]:
    Counting.allocated = 0
    fetcher = Counting(
        ctx=Context(Events(fd=os.open(os.devnull, os.O_WRONLY))),
        s5=store,  # type: ignore[arg-type]
        store_prefix="m/",
        manifest=manifest,
        codecs=for_restore(["none"], False),
        window=window,
    )
    out = []
    try:
        while True:
            item = fetcher.next()
            if item is None:
                return out
            token, view = item
            out.append(bytes(view))
            fetcher.release(token)
    finally:
        fetcher.close()


def test_chunks_come_out_in_order_and_a_pack_used_again_soon_is_fetched_once() -> None:
    order = [("g", 0), ("b", 0), ("g", 1), ("b", 1), ("g", 2), ("g", 3)]
    manifest, objects, stream = make(order)
    store = DictStore({"m/" + k: v for k, v in objects.items()})
    assert drain(manifest, store) == stream
    pack = [k for k in store.gets if "/packs/" in k]
    assert len(pack) == 1 and len(store.gets) == 3


def test_consecutive_blocks_in_one_run_are_served_by_one_fetch() -> None:
    order = [("g", 0)] + [("b", i) for i in range(10)] + [("g", 1)]
    manifest, objects, stream = make(order, run_size=2 * 5010)  # two blocks of ~5000 bytes per run
    assert len(objects) == 1 + 5
    store = DictStore({"m/" + k: v for k, v in objects.items()})
    assert drain(manifest, store, window=2) == stream
    pack = "m/" + manifest["objects"][manifest["chunks"][0]["object"]]["key"]
    runs = [k for k in store.gets if k != pack]
    assert len(runs) == len(set(runs)) == 5  # each run once, for both of its blocks


def test_a_pack_used_again_much_later_is_fetched_again_and_buffers_stay_bounded() -> None:
    order = [("g", 0)] + [("b", i) for i in range(40)] + [("g", 1)]
    manifest, objects, stream = make(order)
    store = DictStore({"m/" + k: v for k, v in objects.items()})
    assert drain(manifest, store, window=2) == stream
    assert sum(1 for k in store.gets if "/packs/" in k) == 2
    # window loads ahead + the planned reuse horizon (window + 2 loads) + the one in use; 42 unbounded
    assert Counting.allocated <= 2 * 2 + 3, Counting.allocated


@pytest.mark.parametrize(
    "damage,code",
    [("delete", "part_missing"), ("truncate", "part_truncated"), ("flip", "part_corrupt"), ("extend", "part_corrupt")],
)
def test_damage_is_reported_with_its_code(damage: str, code: str) -> None:
    manifest, objects, _ = make([("g", 0), ("b", 0), ("b", 1)])
    store = DictStore({"m/" + k: v for k, v in objects.items()})
    key = "m/" + manifest["objects"][-1]["key"]
    if damage == "delete":
        del store.objects[key]
    elif damage == "truncate":
        store.objects[key] = store.objects[key][:-1]
    elif damage == "flip":
        store.objects[key] = bytes([store.objects[key][0] ^ 1]) + store.objects[key][1:]
    else:
        store.objects[key] += b"x"
    with pytest.raises(ScriptError) as err:
        drain(manifest, store)
    assert err.value.code == code


def make_zstd(new: bool, raws: list[bytes], put: list[bytes] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A v2 manifest of zstd chunks of `raws` in one pack, all `new` or all reused (`new: false`).
    `put` replaces the frames written into the pack; the manifest still records the true ones."""
    zstd = for_restore(["zstd"], False)["zstd"]
    true = [bytes(zstd.compress(r)) for r in raws]
    builder = PackBuilder(pack_size=1 << 20, chunk_max=1 << 16)
    entries = []
    for raw, frame, stored in zip(raws, true, put or true):
        loc = builder.add(h(raw), stored, len(raw), "zstd", h(frame))[0]
        entries.append((h(raw), len(raw), loc, "block", new))
    key, view, _buf, _locs, _size, _meta = builder.flush()  # type: ignore[misc]
    return manifest_of(entries, "zstd"), {key: bytes(view)}


def drain_zstd(
    manifest: dict[str, Any], objects: dict[str, bytes], codecs: dict[str, Any] | None = None
) -> list[bytes]:
    fetcher = ChunkFetcher(
        ctx=Context(Events(fd=os.open(os.devnull, os.O_WRONLY))),
        s5=DictStore({"m/" + k: v for k, v in objects.items()}),  # type: ignore[arg-type]
        store_prefix="m/",
        manifest=manifest,
        codecs=codecs or for_restore(["zstd"], False),
        window=2,
    )
    out = []
    try:
        while (item := fetcher.next()) is not None:
            out.append(bytes(item[1]))
            fetcher.release(item[0])
    finally:
        fetcher.close()
    return out


def some_raws() -> list[bytes]:
    return [os.urandom(3000) + bytes(3000) for _ in range(3)]


@pytest.mark.parametrize("new", [True, False])
def test_zstd_chunks_restore_whether_stored_by_this_snapshot_or_reused(new: bool) -> None:
    raws = some_raws()
    manifest, objects = make_zstd(new, raws)
    assert drain_zstd(manifest, objects) == raws


@pytest.mark.parametrize("new", [True, False])
@pytest.mark.parametrize("damage", ["flip", "other_frame", "frame_without_checksum"])
def test_a_damaged_or_swapped_zstd_chunk_is_part_corrupt_reused_or_not(new: bool, damage: str) -> None:
    """A reused chunk is checked by its decoded bytes' SHA-256 alone (the stored bytes' hash is
    skipped: one hash, not two); every kind of damage is still caught, for a new one by its stored
    bytes' hash (its frame checksum only vouches for the frame)."""
    import zstandard

    raws = some_raws()
    frames = [bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(r)) for r in raws]
    if damage == "flip":
        bad = bytearray(frames[1])
        bad[len(bad) // 2] ^= 0x40
        frames[1] = bytes(bad)
    elif damage == "other_frame":  # a valid frame, checksum and all, of other bytes of the same size
        frames[1] = bytes(zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(6000)))
    else:  # the chunk's bytes altered, in a frame with no checksum to catch it
        frames[1] = bytes(zstandard.ZstdCompressor(write_checksum=False).compress(raws[1][:-1] + b"\x01"))
    manifest, objects = make_zstd(new, raws, frames)
    with pytest.raises(ScriptError) as err:
        drain_zstd(manifest, objects)
    assert err.value.code == "part_corrupt"


@pytest.mark.parametrize("new", [True, False])
def test_the_zstd_binary_decodes_chunks_when_the_zstandard_package_is_missing(new: bool) -> None:
    """A host without the zstandard package restores with the `zstd` binary (gs_zstd_cli): reused
    chunks too, and they keep their stored bytes' hash (that decoder is another program)."""
    import shutil

    from gs_zstd_cli import ZstdCliCodec

    binary = shutil.which("zstd")
    if binary is None:
        pytest.skip("no zstd binary on this machine (`make system-deps` installs it)")
    raws = some_raws()
    manifest, objects = make_zstd(new, raws)
    assert drain_zstd(manifest, objects, {"zstd": ZstdCliCodec(binary)}) == raws
    assert ZstdCliCodec.decodes_untrusted_input is False
