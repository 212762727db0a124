"""snapshot.py, format 2: chunks shared by a machine's snapshots (docs/data-plane.md, "Format 2").

Order: list the machine's store (`M chunks/`, `M packs/`; also the credentials check) -> drop a
manifest at our prefix (an earlier attempt's) -> HEAD the packs an earlier attempt left, read the TOC
of its group packs (its runs: when a block they hold comes by) ->
stream tar through the chunker, storing only chunks the store does not hold -> a listing confirms
every referenced object is present at its size -> manifest v2 last (the commit point).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

from gs_chunker import DEFAULT_BLOCK_SIZE, GROUP_MAX, GROUP_MODULUS, LARGE_MIN
from gs_chunkpipe import ChunkUploader
from gs_chunkstore import ChunkIndex, parse_known
from gs_codecs import Codec, fallback_warning
from gs_common import Context, ScriptError, heartbeat, key_prefix, require
from gs_manifest import MANIFEST_NAME, build_v2, upload
from gs_packer import DEFAULT_PACK_SIZE
from gs_s3 import S5
from gs_scan import BackgroundScan
from gs_upload import BatchUploader


def parse_config(cfg: Dict[str, Any], opts: Dict[str, Any]) -> Dict[str, Any]:
    store = key_prefix(require(cfg, "store_prefix", str))
    rest = opts["prefix"][len(store) :] if opts["prefix"].startswith(store) else ""
    if not rest or "/" in rest[:-1] or rest in ("chunks/", "packs/"):
        raise ScriptError("bad_config", "prefix must be <store_prefix><snapshot_id>/ for format 2")
    v2 = {
        "store_prefix": store,
        "known": parse_known(require(cfg, "known_chunks", list, [])),
        "block_size": require(cfg, "block_size", int, DEFAULT_BLOCK_SIZE, within=(4096, 256 << 20)),
        "pack_size": require(cfg, "pack_size", int, DEFAULT_PACK_SIZE, within=(4096, 256 << 20)),
        # Test knobs only (the defaults are the design's): small trees need small cut points.
        "large_min": require(cfg, "large_min", int, LARGE_MIN, within=(512, 1 << 30)),
        "group_max": require(cfg, "group_max", int, GROUP_MAX, within=(4096, 64 << 20)),
        "group_modulus": require(cfg, "group_modulus", int, GROUP_MODULUS, within=(1, 1 << 20)),
    }
    if v2["block_size"] % 512:
        raise ScriptError("bad_config", "block_size must be a multiple of 512")
    return v2


def run(
    *,
    ctx: Context,
    cfg: Dict[str, Any],
    opts: Dict[str, Any],
    v2: Dict[str, Any],
    codec: Codec,
    s5: S5,
    started: float,
    created_at: str,
    make_tar: Callable[[int], List[str]],
    source: Callable[[], Dict[str, Any]],
    walk: BackgroundScan,
) -> Dict[str, Any]:
    prefix, store, events = opts["prefix"], v2["store_prefix"], ctx.events
    if prefix + MANIFEST_NAME in s5.list(prefix):
        s5.remove([prefix + MANIFEST_NAME])  # an earlier attempt's: it is rewritten last, as in v1
    t_resume = time.monotonic()
    index = ChunkIndex(s5, store, v2["known"], max_raw=max(v2["block_size"], v2["group_max"]))
    # A pack holds at most pack_size bytes of chunks plus one group or block and its TOC (rows of ~200
    # bytes for chunks of at least 512): twice that is a generous bound that keeps the memory bound.
    orphans = index.resume_packs(
        2 * (v2["pack_size"] + max(v2["group_max"], v2["block_size"])), workers=opts["parallelism"]
    )
    total = walk.total()  # known already on a tree of few files; else the first chunks' events say it
    events.progress(
        force=True,
        phase="upload",
        bytes_done=0,
        bytes_total=total,
        parts_done=0,
        parts_total=None if total is None else max(1, -(-total // v2["block_size"])),
    )
    heartbeat(events, ctx)
    t_stream = time.monotonic()
    with BatchUploader(s5, workers=opts["parallelism"]) as batch:
        uploader = ChunkUploader(
            ctx=ctx,
            codec=codec,
            index=index,
            put=lambda key, data, meta: batch.put(store + key, data, meta),
            block_size=v2["block_size"],
            pack_size=v2["pack_size"],
            group_max=v2["group_max"],
            large_min=v2["large_min"],
            modulus=v2["group_modulus"],
            parallelism=opts["parallelism"],
            total=walk.total,
        )
        chunks, files = uploader.run(make_tar)

    t_verify = time.monotonic()
    events.progress(force=True, phase="verify")
    index.check_present([loc for _, _, loc, _, _ in chunks])
    t_manifest = time.monotonic()
    events.progress(force=True, phase="manifest")
    bytes_total, entries = walk.result()
    timings = {
        "scan_s": round(walk.seconds, 3),  # beside the resume and the stream, not before them
        "resume_s": round(t_stream - t_resume, 3),
        "stream_s": round(t_verify - t_stream, 3),
        "verify_s": round(t_manifest - t_verify, 3),
    }
    timings.update(uploader.timings())
    src = source()
    warning = fallback_warning(codec)
    warnings = [warning] if warning else []
    if codec.fallback:
        src["codec_fallback"] = codec.fallback
    chunking = {
        "block_size": v2["block_size"],
        "large_min": v2["large_min"],
        "group_max": v2["group_max"],
        "group_modulus": v2["group_modulus"],
    }
    manifest = build_v2(
        cfg=cfg,
        codec=codec.name,
        chunking=chunking,
        entries=chunks,
        files=files,
        bytes_uploaded=uploader.bytes_uploaded,
        source=src,
        created_at=created_at,
        timings=dict(timings, total_s=round(time.monotonic() - started, 3)),
    )
    if warnings:
        manifest["warnings"] = warnings
    digest = upload(s5, prefix, manifest)
    timings["manifest_s"] = round(time.monotonic() - t_manifest, 3)
    totals = manifest["totals"]
    events.progress(
        force=True,
        phase="done",
        bytes_done=totals["raw_bytes"],
        bytes_total=totals["raw_bytes"],
        parts_done=len(chunks),
        parts_total=len(chunks),
    )
    return {
        "format": 2,
        "manifest_key": prefix + MANIFEST_NAME,
        "manifest_sha256": digest,
        "raw_bytes": totals["raw_bytes"],
        "stored_bytes": totals["stored_bytes"],
        "parts": len(chunks),
        "files": files,
        "codec": codec.name,
        "part_size": v2["block_size"],
        "chunks": totals["chunks"],
        "chunks_new": totals["chunks_new"],
        "chunks_reused": totals["chunks_reused"],
        "bytes_uploaded": totals["bytes_uploaded"],
        "objects": totals["objects"],
        "uploaded_parts": totals["chunks_new"],
        "skipped_parts": totals["chunks_reused"],
        "objects_uploaded": uploader.objects_uploaded,
        "resumed_chunks": index.resumed_chunks,
        "resumed_packs": index.packs_read,
        "orphan_packs": orphans,
        "known_dropped": index.dropped,
        "scan": {"entries": max(0, entries - 1), "bytes": bytes_total},
        "duration_s": round(time.monotonic() - started, 3),
        "timings": timings,
        "warnings": warnings,
        "codec_fallback": codec.fallback,
    }
