"""The snapshot manifest (`<prefix>manifest.json`): build on snapshot, validate on restore.

Version 2 (format 2, chunks shared across a machine's snapshots): see build_v2/validate_v2 below and
docs/data-plane.md.

Version 1 format (docs/architecture.md): {"format": "gpusnap-manifest", "version": 1, snapshot_id, instance_id,
created_at, finished_at, codec, part_size, parts: [{index, key, codec, raw_size, stored_size, sha256,
raw_sha256}], totals: {raw_bytes, stored_bytes, parts, files}, decode: {requires_gpu, nvcomp_major?},
source: {...}, timings: {...}}.
"""

from __future__ import annotations

import hashlib
import json
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


def upload(s5: Any, prefix: str, manifest: Dict[str, Any]) -> str:
    """Write the manifest (the commit point: a snapshot without it does not exist), last, and check its
    size in the bucket. Returns the SHA-256 the control plane records."""
    body = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    s5.put(prefix + MANIFEST_NAME, body, {"sha256": digest})
    if s5.head(prefix + MANIFEST_NAME)["size"] != len(body):
        raise ScriptError("upload_failed", "manifest size mismatch after upload")
    return digest


def build(
    *,
    cfg: Dict[str, Any],
    codec: str,
    part_size: int,
    parts: List[Dict[str, Any]],
    files: int,
    source: Dict[str, Any],
    created_at: str,
    timings: Dict[str, float],
) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "snapshot_id": str(cfg.get("snapshot_id") or ""),
        "instance_id": str(cfg.get("instance_id") or ""),
        "created_at": created_at,
        "finished_at": utc_now(),
        "codec": codec,
        "part_size": part_size,
        "parts": parts,
        "totals": {
            "raw_bytes": sum(p["raw_size"] for p in parts),
            "stored_bytes": sum(p["stored_size"] for p in parts),
            "parts": len(parts),
            "files": files,
        },
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
    """Return `doc` if it is a well-formed version-1 or version-2 manifest, else raise manifest_invalid."""
    if isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == VERSION_2:
        return validate_v2(doc)
    return validate_v1(doc)


def validate_v1(doc: Any) -> Dict[str, Any]:
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


# ---- version 2 ---------------------------------------------------------------------------------

VERSION_2 = 2
OBJECT_KEY = re.compile(r"^(chunks|packs)/[0-9a-f]{64}$")
KINDS = ("block", "group")
# No format-2 chunk or object is larger than the chunking allows: a block is at most block_size and a group
# at most group_max (snapshot.py accepts at most 256 MiB and 64 MiB), a stored chunk never larger than its
# raw bytes (gs_codecs.encode_part), a pack at most pack_size (<= 256 MiB) + one group + its TOC. Restore
# sizes its buffers from the manifest, so a bigger claim is refused here, before any allocation.
MAX_CHUNK_BYTES = 256 << 20
MAX_OBJECT_BYTES = 1 << 30


def build_v2(
    *,
    cfg: Dict[str, Any],
    codec: str,
    chunking: Dict[str, int],
    entries: List[Any],
    files: int,
    bytes_uploaded: int,
    source: Dict[str, Any],
    created_at: str,
    timings: Dict[str, float],
) -> Dict[str, Any]:
    """entries: (raw_sha256, raw_size, Loc, kind, new) in stream order (gs_chunkpipe)."""
    objects: List[Dict[str, Any]] = []
    where: Dict[str, int] = {}
    chunks = []
    for raw, raw_size, loc, kind, new in entries:
        if loc.key not in where:
            where[loc.key] = len(objects)
            objects.append({"key": loc.key, "size": loc.object_size, "sha256": loc.object_sha256})
        chunks.append(
            {
                "raw_sha256": raw,
                "raw_size": raw_size,
                "object": where[loc.key],
                "offset": loc.offset,
                "stored_size": loc.stored_size,
                "codec": loc.codec,
                "sha256": loc.sha256,
                "kind": kind,
                "new": bool(new),
            }
        )
    new_count = sum(1 for c in chunks if c["new"])
    return {
        "format": FORMAT,
        "version": VERSION_2,
        "snapshot_id": str(cfg.get("snapshot_id") or ""),
        "instance_id": str(cfg.get("instance_id") or ""),
        "created_at": created_at,
        "finished_at": utc_now(),
        "codec": codec,
        "chunking": chunking,
        "objects": objects,
        "chunks": chunks,
        "totals": {
            "raw_bytes": sum(c["raw_size"] for c in chunks),
            "stored_bytes": sum(o["size"] for o in objects),
            "chunks": len(chunks),
            "chunks_new": new_count,
            "chunks_reused": len(chunks) - new_count,
            "bytes_uploaded": bytes_uploaded,
            "objects": len(objects),
            "files": files,
        },
        "source": source,
        "timings": timings,
    }


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise _bad("%s is not a hex SHA-256" % what)
    return value


def validate_v2(doc: Dict[str, Any]) -> Dict[str, Any]:
    """Strict: object keys ^(chunks|packs)/<hex64>$ (a manifest cannot point restore anywhere else),
    each listed once and used; chunk object indexes in range, offset + stored_size within the object
    (a block object is exactly its one chunk), known codecs and kinds, and totals that add up."""
    chunking = doc.get("chunking")
    if not isinstance(chunking, dict):
        raise _bad("chunking must be an object")
    objects, chunks = doc.get("objects"), doc.get("chunks")
    if not isinstance(objects, list) or not isinstance(chunks, list) or not chunks:
        raise _bad("objects and chunks must be lists (chunks not empty)")
    seen = set()
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not OBJECT_KEY.match(obj["key"]):
            raise _bad("object %d has a bad key %r" % (i, obj.get("key") if isinstance(obj, dict) else obj))
        if obj["key"] in seen:
            raise _bad("object %s is listed twice" % obj["key"])
        seen.add(obj["key"])
        if _int(obj.get("size"), "object %d size" % i) > MAX_OBJECT_BYTES:
            raise _bad("object %s claims %d bytes, more than format 2 ever stores" % (obj["key"], obj["size"]))
        _hex(obj.get("sha256"), "object %d sha256" % i)
        if obj["key"].startswith("packs/") and obj["key"][6:] != obj["sha256"]:
            raise _bad("pack %s is not named by its SHA-256" % obj["key"])
    used = set()
    for i, c in enumerate(chunks):
        if not isinstance(c, dict):
            raise _bad("chunk %d is not an object" % i)
        _hex(c.get("raw_sha256"), "chunk %d raw_sha256" % i)
        _hex(c.get("sha256"), "chunk %d sha256" % i)
        raw_size, stored = (
            _int(c.get("raw_size"), "chunk %d raw_size" % i),
            _int(c.get("stored_size"), "chunk %d stored_size" % i),
        )
        offset, index = _int(c.get("offset"), "chunk %d offset" % i), _int(c.get("object"), "chunk %d object" % i)
        if raw_size > MAX_CHUNK_BYTES:
            raise _bad("chunk %d claims %d raw bytes, more than format 2 ever cuts" % (i, raw_size))
        if c.get("codec") not in PART_CODECS or c.get("kind") not in KINDS or not isinstance(c.get("new"), bool):
            raise _bad("chunk %d has a bad codec, kind or new flag" % i)
        if c["codec"] == "none" and (stored != raw_size or c["sha256"] != c["raw_sha256"]):
            raise _bad("raw chunk %d: stored and raw differ" % i)
        if index >= len(objects):
            raise _bad("chunk %d names object %d of %d" % (i, index, len(objects)))
        obj = objects[index]
        if offset + stored > obj["size"]:
            raise _bad("chunk %d lies beyond the end of %s" % (i, obj["key"]))
        if obj["key"].startswith("chunks/") and (
            offset != 0 or stored != obj["size"] or obj["key"][7:] != c["raw_sha256"] or obj["sha256"] != c["sha256"]
        ):
            raise _bad("chunk %d does not fill its block object %s" % (i, obj["key"]))
        used.add(index)
    if len(used) != len(objects):
        raise _bad("objects lists %d objects that no chunk uses" % (len(objects) - len(used)))
    totals = doc.get("totals")
    if not isinstance(totals, dict):
        raise _bad("totals must be an object")
    new = sum(1 for c in chunks if c["new"])
    expect = {
        "raw_bytes": sum(c["raw_size"] for c in chunks),
        "stored_bytes": sum(o["size"] for o in objects),
        "chunks": len(chunks),
        "chunks_new": new,
        "chunks_reused": len(chunks) - new,
        "objects": len(objects),
    }
    for name, value in expect.items():
        if _int(totals.get(name), "totals.%s" % name) != value:
            raise _bad("totals.%s is %r, the chunks say %d" % (name, totals.get(name), value))
    _int(totals.get("bytes_uploaded", 0), "totals.bytes_uploaded")
    _int(totals.get("files", 0), "totals.files")
    return doc
