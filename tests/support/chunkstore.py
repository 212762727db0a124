"""Hand-built format-2 snapshots (docs/data-plane.md, _brief/DEDUP-DESIGN.md): blocks, packs and a v2
manifest written into a store (fake or SeaweedFS), and the matching complete snapshot row with its
index, as a completed snapshot job would leave them. Used until, and beside, the host's snapshot.py v2."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from src.db import transaction
from src.jobs.chunk_index import record_manifest
from src.manifest import parse_manifest
from src.models import Machine, Snapshot, new_id, utcnow
from src.pack import PackEntry, build_pack


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_v2(store: Any, store_prefix: str, snapshot_id: str, *, blocks: list[bytes], groups: list[bytes],
             known: set[str] | None = None) -> bytes:
    """Write `blocks` (one object each, stored raw) and `groups` (one pack) under the machine prefix and a
    v2 manifest under `<store_prefix><snapshot_id>/`. Chunks in `known` (raw digests) are referenced,
    not written again (`new: false`); a pack is written only when it holds a new group. Returns the manifest."""
    known = known or set()
    objects: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    uploaded = 0
    for data in blocks:
        raw = _sha(data)
        key = f"chunks/{raw}"
        new = raw not in known
        if new:
            store.put_bytes(store_prefix + key, data)
            uploaded += len(data)
        if key not in [o["key"] for o in objects]:
            objects.append({"key": key, "size": len(data), "sha256": raw})
        chunks.append({"raw_sha256": raw, "raw_size": len(data), "object": [o["key"] for o in objects].index(key),
                       "offset": 0, "stored_size": len(data), "codec": "none", "sha256": raw, "kind": "block",
                       "new": new})
    if groups:
        unique = list(dict.fromkeys(groups))
        pack, entries = build_pack([(PackEntry(_sha(g), 0, len(g), len(g), "none", _sha(g)), g) for g in unique])
        key = f"packs/{_sha(pack)}"
        new_pack = any(_sha(g) not in known for g in unique)
        if new_pack:
            store.put_bytes(store_prefix + key, pack)
            uploaded += len(pack)
        objects.append({"key": key, "size": len(pack), "sha256": _sha(pack)})
        where = {e.raw_sha256: e for e in entries}
        for g in groups:
            e = where[_sha(g)]
            chunks.append({"raw_sha256": e.raw_sha256, "raw_size": e.raw_size, "object": len(objects) - 1,
                           "offset": e.offset, "stored_size": e.stored_size, "codec": "none", "sha256": e.sha256,
                           "kind": "group", "new": e.raw_sha256 not in known})
    new_count = sum(1 for c in chunks if c["new"])
    doc = {"format": "gpusnap-manifest", "version": 2, "snapshot_id": snapshot_id, "instance_id": "m",
           "codec": "none", "chunking": {"block_size": 16 << 20, "large_min": 256 << 10, "group_max": 4 << 20,
                                         "group_modulus": 64},
           "objects": objects, "chunks": chunks,
           "totals": {"raw_bytes": sum(c["raw_size"] for c in chunks), "stored_bytes": sum(o["size"] for o in objects),
                      "chunks": len(chunks), "chunks_new": new_count, "chunks_reused": len(chunks) - new_count,
                      "bytes_uploaded": uploaded, "objects": len(objects), "files": 1}}
    raw = json.dumps(doc).encode()
    store.put_bytes(f"{store_prefix}{snapshot_id}/manifest.json", raw)
    return raw


def add_v2_snapshot(app: Any, store: Any, *, machine_id: str = "m1", blocks: list[bytes] = (),
                    groups: list[bytes] = (), known: set[str] | None = None, status: str = "complete",
                    machine_status: str = "running") -> dict[str, Any]:
    """A format-2 snapshot row (complete by default) with real objects behind it, indexed."""
    c = app.extensions["gpusnap"]
    snap_id = new_id("snap")
    store_prefix = f"{c.settings.snapshot_prefix}{machine_id}/"
    raw = write_v2(store, store_prefix, snap_id, blocks=list(blocks), groups=list(groups), known=known)
    manifest = parse_manifest(raw)
    with transaction(c.session_factory) as s:
        if s.get(Machine, machine_id) is None:
            s.add(Machine(id=machine_id, status=machine_status, ssh_host="127.0.0.1", ssh_port=22))
            s.flush()
        s.add(Snapshot(id=snap_id, machine_id=machine_id, status=status, storage_prefix=f"{store_prefix}{snap_id}/",
                       workspace_path="/workspace", codec="none", part_count=len(manifest.chunks),
                       raw_bytes=manifest.raw_bytes, stored_bytes=manifest.stored_bytes, file_count=1, format=2,
                       chunks_new=manifest.totals["chunks_new"], chunks_reused=manifest.totals["chunks_reused"],
                       bytes_uploaded=manifest.totals["bytes_uploaded"], manifest_sha256=manifest.sha256,
                       completed_at=utcnow() if status == "complete" else None))
        s.flush()
        if status == "complete":
            record_manifest(s, snap_id, machine_id, manifest)
    return {"id": snap_id, "store_prefix": store_prefix, "prefix": f"{store_prefix}{snap_id}/", "manifest": manifest}
