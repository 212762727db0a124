"""The snapshot manifest (`manifest.json`, written last by the snapshot script) as the control plane
reads it. The format is in docs/architecture.md; `src/remote_scripts` writes it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from src.errors import JobFailed

FORMAT = "gpusnap-manifest"
MANIFEST_NAME = "manifest.json"
# The most the control plane reads of a manifest from the bucket (the host's restore script caps it the same:
# src/remote_scripts/restore.py MAX_MANIFEST_BYTES). A bigger object is refused, never buffered.
MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True)
class Part:
    index: int
    key: str
    codec: str
    raw_size: int
    stored_size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    snapshot_id: str
    codec: str
    part_size: int
    parts: list[Part]
    raw_bytes: int
    stored_bytes: int
    files: int
    sha256: str  # of the manifest file itself


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and sanity-check a manifest. Raises JobFailed(`manifest_invalid`)."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT or int(doc.get("version", 0)) != 1:
            raise ValueError(f"not a {FORMAT} version 1 document")
        parts = [Part(index=int(p["index"]), key=str(p["key"]), codec=str(p["codec"]), raw_size=int(p["raw_size"]),
                      stored_size=int(p["stored_size"]), sha256=str(p["sha256"])) for p in doc["parts"]]
        totals = doc["totals"]
        manifest = Manifest(snapshot_id=str(doc["snapshot_id"]), codec=str(doc.get("codec", "")),
                            part_size=int(doc.get("part_size", 0)), parts=parts,
                            raw_bytes=int(totals["raw_bytes"]), stored_bytes=int(totals["stored_bytes"]),
                            files=int(totals.get("files", 0)), sha256=hashlib.sha256(raw).hexdigest())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise JobFailed(f"the manifest cannot be read: {e}", code="manifest_invalid") from None
    if [p.index for p in parts] != list(range(len(parts))):
        raise JobFailed("the manifest's parts are not numbered 0..n-1", code="manifest_invalid")
    if sum(p.raw_size for p in parts) != manifest.raw_bytes or sum(p.stored_size for p in parts) != manifest.stored_bytes:
        raise JobFailed("the manifest's totals do not add up", code="manifest_invalid")
    if any("/" in p.key or ".." in p.key for p in parts):
        raise JobFailed("the manifest names a part outside its snapshot", code="manifest_invalid")
    return manifest


# nvCOMP 6's wheels exist for CUDA 12 and 13 (src/remote_scripts/gs_bootstrap.py _NVCOMP); ANS has no CPU
# decoder, so a snapshot whose codec is nvcomp-ans restores only where such a GPU and driver are.
GPU_ONLY_CODECS = ("nvcomp-ans",)
NVCOMP_MIN_CUDA = 12.0


def decode_needs(codec: str | None) -> dict[str, Any]:
    """What a host must have to decode a snapshot of this codec: {"requires_gpu", "min_cuda"} (min_cuda
    None: any host). A GPU snapshot may hold parts that fell back to zstd, never the reverse, so judging
    by the snapshot's codec never lets a CPU-only host take GPU parts."""
    gpu = codec in GPU_ONLY_CODECS
    return {"requires_gpu": gpu, "min_cuda": NVCOMP_MIN_CUDA if gpu else None}
