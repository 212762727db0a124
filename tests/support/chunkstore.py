"""Hand-built format-2 snapshots (docs/data-plane.md, _brief/DEDUP-DESIGN.md): blocks, packs and a v2
manifest written into a store (fake or SeaweedFS), and the matching complete snapshot row with its
index, as a completed snapshot job would leave them. Used until, and beside, the host's snapshot.py v2."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from src.db import transaction
from src.jobs.chunk_index import record_manifest
from src.manifest import Manifest, parse_manifest
from src.models import Machine, Snapshot, new_id, utcnow
from src.pack import PackEntry, build_pack


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_v2(
    store: Any,
    store_prefix: str,
    snapshot_id: str,
    *,
    blocks: list[bytes],
    groups: list[bytes],
    previous: Manifest | None = None,
    run: bool = False,
) -> bytes:
    """Write `blocks` (one object each, stored raw, as the first format-2 writer did; with `run`: the
    new ones in one pack, a run, as the host writes them now) and the new ones of `groups` (one pack)
    under the machine prefix, and a v2 manifest under `<store_prefix><snapshot_id>/`. Chunks `previous`
    (an earlier snapshot's manifest) holds are referenced where it stored them (`new: false`), as the
    host does with the known_chunks it is told. Returns the manifest."""
    old = {c.raw_sha256: (previous.objects[c.object], c) for c in previous.chunks} if previous else {}
    objects: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    uploaded = 0

    def object_index(key: str, size: int, sha: str) -> int:
        for i, o in enumerate(objects):
            if o["key"] == key:
                return i
        objects.append({"key": key, "size": size, "sha256": sha})
        return len(objects) - 1

    fresh = list(dict.fromkeys(g for g in groups if _sha(g) not in old))
    where: dict[str, PackEntry] = {}
    if fresh:
        pack, entries = build_pack([(PackEntry(_sha(g), 0, len(g), len(g), "none", _sha(g)), g) for g in fresh])
        store.put_bytes(f"{store_prefix}packs/{_sha(pack)}", pack)
        uploaded += len(pack)
        pack_obj = (f"packs/{_sha(pack)}", len(pack), _sha(pack))
        where = {e.raw_sha256: e for e in entries}
    in_run: dict[str, PackEntry] = {}
    if run:
        fresh_blocks = list(dict.fromkeys(b for b in blocks if _sha(b) not in old))
        if fresh_blocks:
            body, entries = build_pack(
                [(PackEntry(_sha(b), 0, len(b), len(b), "none", _sha(b)), b) for b in fresh_blocks]
            )
            store.put_bytes(f"{store_prefix}packs/{_sha(body)}", body)
            uploaded += len(body)
            run_obj = (f"packs/{_sha(body)}", len(body), _sha(body))
            in_run = {e.raw_sha256: e for e in entries}
    written: set[str] = set()
    for kind, data in [("block", b) for b in blocks] + [("group", g) for g in groups]:
        raw = _sha(data)
        new = raw not in old and raw not in written
        if raw in old:
            obj, c = old[raw]
            index, offset = object_index(obj.key, obj.size, obj.sha256), c.offset
        elif kind == "block" and run:
            index, offset = object_index(*run_obj), in_run[raw].offset
        elif kind == "block":
            if new:
                store.put_bytes(f"{store_prefix}chunks/{raw}", data)
                uploaded += len(data)
            index, offset = object_index(f"chunks/{raw}", len(data), raw), 0
        else:
            index, offset = object_index(*pack_obj), where[raw].offset
        written.add(raw)
        chunks.append(
            {
                "raw_sha256": raw,
                "raw_size": len(data),
                "object": index,
                "offset": offset,
                "stored_size": len(data),
                "codec": "none",
                "sha256": raw,
                "kind": kind,
                "new": new,
            }
        )
    new_count = sum(1 for c in chunks if c["new"])
    doc = {
        "format": "gpusnap-manifest",
        "version": 2,
        "snapshot_id": snapshot_id,
        "instance_id": "m",
        "codec": "none",
        "chunking": {"block_size": 16 << 20, "large_min": 256 << 10, "group_max": 4 << 20, "group_modulus": 64},
        "objects": objects,
        "chunks": chunks,
        "totals": {
            "raw_bytes": sum(c["raw_size"] for c in chunks),
            "stored_bytes": sum(o["size"] for o in objects),
            "chunks": len(chunks),
            "chunks_new": new_count,
            "chunks_reused": len(chunks) - new_count,
            "bytes_uploaded": uploaded,
            "objects": len(objects),
            "files": 1,
        },
    }
    raw = json.dumps(doc).encode()
    store.put_bytes(f"{store_prefix}{snapshot_id}/manifest.json", raw)
    return raw


def add_v2_snapshot(
    app: Any,
    store: Any,
    *,
    machine_id: str = "m1",
    blocks: list[bytes] = (),
    groups: list[bytes] = (),
    previous: Manifest | None = None,
    status: str = "complete",
    machine_status: str = "running",
    run: bool = False,
) -> dict[str, Any]:
    """A format-2 snapshot row (complete by default) with real objects behind it, indexed."""
    c = app.extensions["gpusnap"]
    snap_id = new_id("snap")
    store_prefix = f"{c.settings.snapshot_prefix}{machine_id}/"
    raw = write_v2(store, store_prefix, snap_id, blocks=list(blocks), groups=list(groups), previous=previous, run=run)
    manifest = parse_manifest(raw)
    with transaction(c.session_factory) as s:
        if s.get(Machine, machine_id) is None:
            s.add(Machine(id=machine_id, status=machine_status, ssh_host="127.0.0.1", ssh_port=22))
            s.flush()
        s.add(
            Snapshot(
                id=snap_id,
                machine_id=machine_id,
                status=status,
                storage_prefix=f"{store_prefix}{snap_id}/",
                workspace_path="/workspace",
                codec="none",
                part_count=len(manifest.chunks),
                raw_bytes=manifest.raw_bytes,
                stored_bytes=manifest.stored_bytes,
                file_count=1,
                format=2,
                chunks_new=manifest.totals["chunks_new"],
                chunks_reused=manifest.totals["chunks_reused"],
                bytes_uploaded=manifest.totals["bytes_uploaded"],
                manifest_sha256=manifest.sha256,
                completed_at=utcnow() if status == "complete" else None,
            )
        )
        s.flush()
        if status == "complete":
            record_manifest(s, snap_id, machine_id, manifest)
    return {"id": snap_id, "store_prefix": store_prefix, "prefix": f"{store_prefix}{snap_id}/", "manifest": manifest}
