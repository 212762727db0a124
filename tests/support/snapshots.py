"""Test helpers that put complete snapshots in place without running a snapshot job: objects in a
store (fake or real) and the matching database row."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from src.db import transaction
from src.models import Machine, Snapshot, new_id, utcnow


def write_snapshot_objects(store: Any, prefix: str, *, snapshot_id: str, parts: int = 3,
                           part_size: int = 1024) -> bytes:
    """Write `parts` random parts and a valid manifest under `prefix`; returns the manifest bytes."""
    entries = []
    for i in range(parts):
        data = os.urandom(part_size)
        key = f"part-{i:05d}"
        store.put_bytes(prefix + key, data)
        digest = hashlib.sha256(data).hexdigest()
        entries.append({"index": i, "key": key, "codec": "none", "raw_size": part_size, "stored_size": part_size,
                        "sha256": digest, "raw_sha256": digest})
    manifest = {"format": "gpusnap-manifest", "version": 1, "snapshot_id": snapshot_id, "codec": "none",
                "part_size": part_size, "parts": entries,
                "totals": {"raw_bytes": parts * part_size, "stored_bytes": parts * part_size, "parts": parts,
                           "files": 1}}
    raw = json.dumps(manifest).encode()
    store.put_bytes(prefix + "manifest.json", raw)
    return raw


def add_complete_snapshot(app: Any, store: Any, *, machine_id: str = "m1", parts: int = 3,
                          part_size: int = 1024) -> dict[str, Any]:
    """A `complete` snapshot row with real objects behind it. Returns its id and prefix."""
    c = app.extensions["gpusnap"]
    snap_id = new_id("snap")
    prefix = f"{c.settings.snapshot_prefix}{machine_id}/{snap_id}/"
    raw = write_snapshot_objects(store, prefix, snapshot_id=snap_id, parts=parts, part_size=part_size)
    with transaction(c.session_factory) as s:
        if s.get(Machine, machine_id) is None:
            s.add(Machine(id=machine_id, status="running", ssh_host="127.0.0.1", ssh_port=22))
        s.add(Snapshot(id=snap_id, machine_id=machine_id, status="complete", storage_prefix=prefix,
                       workspace_path="/workspace", codec="none", part_count=parts, part_size=part_size,
                       raw_bytes=parts * part_size, stored_bytes=parts * part_size, file_count=1,
                       manifest_sha256=hashlib.sha256(raw).hexdigest(), completed_at=utcnow()))
    return {"id": snap_id, "prefix": prefix}
