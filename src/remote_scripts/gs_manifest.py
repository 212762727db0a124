"""The snapshot manifest (`<prefix>manifest.json`): build on snapshot, validate on restore.

Format (docs/architecture.md): {"format": "gpusnap-manifest", "version": 1, snapshot_id, instance_id,
created_at, finished_at, codec, part_size, parts: [{index, key, codec, raw_size, stored_size, sha256,
raw_sha256}], totals: {raw_bytes, stored_bytes, parts, files}, decode: {requires_gpu, nvcomp_major?},
source: {...}, timings: {...}}.
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, List

from gs_codecs import PART_CODECS, decode_requirements
from gs_common import ScriptError

FORMAT = "gpusnap-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def part_key(index: int) -> str:
    return "part-%05d" % index


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build(*, cfg: Dict[str, Any], codec: str, part_size: int, parts: List[Dict[str, Any]], files: int,
          source: Dict[str, Any], created_at: str, timings: Dict[str, float]) -> Dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION,
        "snapshot_id": str(cfg.get("snapshot_id") or ""), "instance_id": str(cfg.get("instance_id") or ""),
        "created_at": created_at, "finished_at": utc_now(),
        "codec": codec, "part_size": part_size,
        "parts": parts,
        "totals": {"raw_bytes": sum(p["raw_size"] for p in parts),
                   "stored_bytes": sum(p["stored_size"] for p in parts),
                   "parts": len(parts), "files": files},
        # What a restore host needs: nvcomp-ans parts have no CPU decoder (gs_codecs).
        "decode": decode_requirements(p["codec"] for p in parts),
        "source": source,
        "timings": timings,
    }


def _bad(message: str) -> ScriptError:
    return ScriptError("manifest_invalid", message)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad("%s must be a non-negative integer" % what)
    return value


def validate(doc: Any) -> Dict[str, Any]:
    """Return `doc` if it is a well-formed version-1 manifest, else raise manifest_invalid.

    Part keys must be exactly part-NNNNN for their index (a manifest cannot point restore at an
    arbitrary object), and the totals must add up."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad("not a gpusnap manifest")
    if doc.get("version") != VERSION:
        raise _bad("unsupported manifest version %r" % (doc.get("version"),))
    parts = doc.get("parts")
    if not isinstance(parts, list):
        raise _bad("parts must be a list")
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise _bad("part %d is not an object" % i)
        if part.get("index") != i or part.get("key") != part_key(i):
            raise _bad("part %d has index/key %r/%r" % (i, part.get("index"), part.get("key")))
        if part.get("codec") not in PART_CODECS:
            raise _bad("part %d has unknown codec %r" % (i, part.get("codec")))
        _int(part.get("raw_size"), "part %d raw_size" % i)
        _int(part.get("stored_size"), "part %d stored_size" % i)
        for field in ("sha256", "raw_sha256"):
            if field == "raw_sha256" and part.get(field) is None and part.get("codec") in ("zstd", "zstd-planes"):
                continue  # zstd frames carry their own content checksum
            if not isinstance(part.get(field), str) or not _HEX64.match(part[field]):
                raise _bad("part %d %s is not a hex SHA-256" % (i, field))
    totals = doc.get("totals")
    if not isinstance(totals, dict):
        raise _bad("totals must be an object")
    if _int(totals.get("raw_bytes"), "totals.raw_bytes") != sum(p["raw_size"] for p in parts):
        raise _bad("totals.raw_bytes does not match the parts")
    if _int(totals.get("stored_bytes"), "totals.stored_bytes") != sum(p["stored_size"] for p in parts):
        raise _bad("totals.stored_bytes does not match the parts")
    if _int(totals.get("parts"), "totals.parts") != len(parts) or not parts:
        raise _bad("totals.parts does not match the parts (or there are none)")
    _int(totals.get("files", 0), "totals.files")
    return doc
