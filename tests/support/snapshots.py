"""Test helpers that put complete snapshots in place without running a snapshot job: objects in a
store (fake or real) and the matching database row."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from src.db import transaction
from src.models import Machine, Snapshot, new_id, utcnow


def write_snapshot_objects(
    store: Any, prefix: str, *, snapshot_id: str, parts: int = 3, part_size: int = 1024, format: int = 1
) -> bytes:
    """Write `parts` random parts and a valid manifest under `prefix`; returns the manifest bytes. With
    `format` 2 (a snapshot the control plane started as format 2), the parts are blocks of the machine's
    chunk store (the parent of `prefix`) and the manifest is version 2: the same bytes either way."""
    if format == 2:
        from tests.support.chunkstore import write_v2

        store_prefix = prefix[: -len(f"{snapshot_id}/")]
        return write_v2(
            store, store_prefix, snapshot_id, blocks=[os.urandom(part_size) for _ in range(parts)], groups=[]
        )
    entries = []
    for i in range(parts):
        data = os.urandom(part_size)
        key = f"part-{i:05d}"
        store.put_bytes(prefix + key, data)
        digest = hashlib.sha256(data).hexdigest()
        entries.append(
            {
                "index": i,
                "key": key,
                "codec": "none",
                "raw_size": part_size,
                "stored_size": part_size,
                "sha256": digest,
                "raw_sha256": digest,
            }
        )
    manifest = {
        "format": "gpusnap-manifest",
        "version": 1,
        "snapshot_id": snapshot_id,
        "codec": "none",
        "part_size": part_size,
        "parts": entries,
        "totals": {"raw_bytes": parts * part_size, "stored_bytes": parts * part_size, "parts": parts, "files": 1},
    }
    raw = json.dumps(manifest).encode()
    store.put_bytes(prefix + "manifest.json", raw)
    return raw


def add_complete_snapshot(
    app: Any, store: Any, *, machine_id: str = "m1", parts: int = 3, part_size: int = 1024
) -> dict[str, Any]:
    """A `complete` snapshot row with real objects behind it. Returns its id and prefix."""
    c = app.extensions["gpusnap"]
    snap_id = new_id("snap")
    prefix = f"{c.settings.snapshot_prefix}{machine_id}/{snap_id}/"
    raw = write_snapshot_objects(store, prefix, snapshot_id=snap_id, parts=parts, part_size=part_size)
    with transaction(c.session_factory) as s:
        if s.get(Machine, machine_id) is None:
            s.add(Machine(id=machine_id, status="running", ssh_host="127.0.0.1", ssh_port=22))
        s.add(
            Snapshot(
                id=snap_id,
                machine_id=machine_id,
                status="complete",
                storage_prefix=prefix,
                workspace_path="/workspace",
                codec="none",
                part_count=parts,
                part_size=part_size,
                raw_bytes=parts * part_size,
                stored_bytes=parts * part_size,
                file_count=1,
                manifest_sha256=hashlib.sha256(raw).hexdigest(),
                completed_at=utcnow(),
            )
        )
    return {"id": snap_id, "prefix": prefix}


def data_keys(store: Any, snap: dict[str, Any]) -> list[str]:
    """The full keys of the objects a snapshot's manifest references, in manifest order, whatever its
    format: `part-NNNNN` under its prefix (1), chunks and packs in the machine's store (2)."""
    from src.manifest import parse_manifest

    prefix = snap["storage_prefix"]
    manifest = parse_manifest(store.get_bytes(prefix + "manifest.json"))
    if manifest.version == 1:
        return [prefix + p.key for p in manifest.parts]
    store_prefix = prefix[: -len(f"{snap['id']}/")]
    return [store_prefix + o.key for o in manifest.objects]
