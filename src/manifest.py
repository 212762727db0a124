"""The snapshot manifest (`manifest.json`, written last by the snapshot script) as the control plane
reads it. Version 1: fixed parts under the snapshot's own prefix. Version 2: chunks stored in the
machine's chunk store (`chunks/<raw sha256>` blocks and `packs/<sha256>` packs, keys relative to the
machine prefix) and shared by its snapshots. The formats are in docs/architecture.md and
docs/data-plane.md; `src/remote_scripts/gs_manifest.py` writes them and validates them the same way."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from src.errors import JobFailed

FORMAT = "gpusnap-manifest"
MANIFEST_NAME = "manifest.json"
# The most the control plane reads of a manifest from the bucket (the host's restore script caps it the same:
# src/remote_scripts/restore.py MAX_MANIFEST_BYTES). A bigger object is refused, never buffered.
MAX_MANIFEST_BYTES = 256 << 20
CODECS = ("zstd", "nvcomp-ans", "none")  # what a manifest may name for a part or chunk (gs_codecs.PART_CODECS)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A v2 object key, relative to the machine prefix: nothing else can be named (no `..`, no other prefix).
OBJECT_KEY = re.compile(r"^(chunks|packs)/[0-9a-f]{64}$")
# The largest raw chunk and stored object format 2 makes (gs_manifest.MAX_CHUNK_BYTES, MAX_OBJECT_BYTES:
# restore sizes its buffers from these claims, so a bigger one is refused).
MAX_CHUNK_BYTES = 256 << 20
MAX_OBJECT_BYTES = 1 << 30


@dataclass(frozen=True)
class Part:
    index: int
    key: str
    codec: str
    raw_size: int
    stored_size: int
    sha256: str


@dataclass(frozen=True)
class StoredObject:
    """An object of the chunk store that a v2 manifest references."""

    key: str  # relative to the machine prefix
    size: int
    sha256: str

    @property
    def kind(self) -> str:
        return "block" if self.key.startswith("chunks/") else "pack"


@dataclass(frozen=True)
class Chunk:
    raw_sha256: str
    raw_size: int
    object: int  # index into Manifest.objects
    offset: int
    stored_size: int
    codec: str
    sha256: str  # of the stored bytes
    kind: str  # block | group
    new: bool


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
    version: int = 1
    objects: list[StoredObject] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict, repr=False)


def _bad(message: str) -> JobFailed:
    return JobFailed(f"the manifest cannot be read: {message}", code="manifest_invalid")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(f"{what} must be a non-negative integer")
    return value


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise _bad(f"{what} must be 64 lowercase hex digits")
    return value


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and sanity-check a manifest of either version. Raises JobFailed(`manifest_invalid`)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise _bad(str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(f"not a {FORMAT} document")
    if doc.get("version") == 2:
        return _parse_v2(doc, hashlib.sha256(raw).hexdigest())
    return _parse_v1(doc, raw)


def _parse_v1(doc: dict[str, Any], raw: bytes) -> Manifest:
    try:
        if int(doc.get("version", 0)) != 1:
            raise ValueError(f"not a {FORMAT} version 1 or 2 document")
        parts = [
            Part(
                index=int(p["index"]),
                key=str(p["key"]),
                codec=str(p["codec"]),
                raw_size=int(p["raw_size"]),
                stored_size=int(p["stored_size"]),
                sha256=str(p["sha256"]),
            )
            for p in doc["parts"]
        ]
        totals = doc["totals"]
        manifest = Manifest(
            snapshot_id=str(doc["snapshot_id"]),
            codec=str(doc.get("codec", "")),
            part_size=int(doc.get("part_size", 0)),
            parts=parts,
            raw_bytes=int(totals["raw_bytes"]),
            stored_bytes=int(totals["stored_bytes"]),
            files=int(totals.get("files", 0)),
            sha256=hashlib.sha256(raw).hexdigest(),
            doc=doc,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise JobFailed(f"the manifest cannot be read: {e}", code="manifest_invalid") from None
    if [p.index for p in parts] != list(range(len(parts))):
        raise JobFailed("the manifest's parts are not numbered 0..n-1", code="manifest_invalid")
    if (
        sum(p.raw_size for p in parts) != manifest.raw_bytes
        or sum(p.stored_size for p in parts) != manifest.stored_bytes
    ):
        raise JobFailed("the manifest's totals do not add up", code="manifest_invalid")
    if any("/" in p.key or ".." in p.key for p in parts):
        raise JobFailed("the manifest names a part outside its snapshot", code="manifest_invalid")
    return manifest


def _parse_v2(doc: dict[str, Any], sha256: str) -> Manifest:
    """Every rule of the host's validator (gs_manifest): keys only under chunks/ or packs/ with a
    digest name, each object listed once, every chunk inside its object, blocks whole objects named
    by their raw digest, and totals that add up. A manifest that breaks one is not restored from."""
    objects_doc, chunks_doc, totals = doc.get("objects"), doc.get("chunks"), doc.get("totals")
    if not isinstance(objects_doc, list) or not isinstance(chunks_doc, list) or not isinstance(totals, dict):
        raise _bad("objects and chunks must be lists, totals an object")
    if not chunks_doc or not isinstance(doc.get("chunking"), dict):
        raise _bad("chunks must not be empty, chunking must be an object")
    if not isinstance(doc.get("snapshot_id"), str):
        raise _bad("snapshot_id must be a string")
    objects: list[StoredObject] = []
    for i, o in enumerate(objects_doc):
        if not isinstance(o, dict):
            raise _bad(f"object {i} is not an object")
        key = o.get("key")
        if not isinstance(key, str) or not OBJECT_KEY.match(key):
            raise _bad(f"object {i} has key {key!r}, not chunks/<sha256> or packs/<sha256>")
        objects.append(
            StoredObject(
                key=key,
                size=_count(o.get("size"), f"object {i} size"),
                sha256=_hex(o.get("sha256"), f"object {i} sha256"),
            )
        )
        if objects[-1].size > MAX_OBJECT_BYTES:
            raise _bad(f"object {key} claims {objects[-1].size} bytes, more than format 2 ever stores")
        if key.startswith("packs/") and key[6:] != objects[-1].sha256:
            raise _bad(f"pack {key} is not named by its SHA-256")
    if len({o.key for o in objects}) != len(objects):
        raise _bad("an object is listed twice")
    chunks: list[Chunk] = []
    used: set[int] = set()
    for i, c in enumerate(chunks_doc):
        if not isinstance(c, dict):
            raise _bad(f"chunk {i} is not an object")
        index = _count(c.get("object"), f"chunk {i} object")
        if index >= len(objects):
            raise _bad(f"chunk {i} names object {index} of {len(objects)}")
        if c.get("codec") not in CODECS:
            raise _bad(f"chunk {i} has unknown codec {c.get('codec')!r}")
        if c.get("kind") not in ("block", "group") or not isinstance(c.get("new"), bool):
            raise _bad(f"chunk {i} needs kind block|group and new true|false")
        chunk = Chunk(
            raw_sha256=_hex(c.get("raw_sha256"), f"chunk {i} raw_sha256"),
            raw_size=_count(c.get("raw_size"), f"chunk {i} raw_size"),
            object=index,
            offset=_count(c.get("offset"), f"chunk {i} offset"),
            stored_size=_count(c.get("stored_size"), f"chunk {i} stored_size"),
            codec=c["codec"],
            sha256=_hex(c.get("sha256"), f"chunk {i} sha256"),
            kind=c["kind"],
            new=c["new"],
        )
        if chunk.raw_size > MAX_CHUNK_BYTES:
            raise _bad(f"chunk {i} claims {chunk.raw_size} raw bytes, more than format 2 ever cuts")
        if chunk.codec == "none" and (chunk.stored_size != chunk.raw_size or chunk.sha256 != chunk.raw_sha256):
            raise _bad(f"raw chunk {i}: stored and raw differ")
        obj = objects[index]
        if chunk.offset + chunk.stored_size > obj.size:
            raise _bad(f"chunk {i} lies outside {obj.key}")
        if obj.kind == "block" and (
            chunk.offset != 0
            or chunk.stored_size != obj.size
            or obj.key != f"chunks/{chunk.raw_sha256}"
            or obj.sha256 != chunk.sha256
        ):
            raise _bad(f"chunk {i} is not the whole of its block object {obj.key}")
        used.add(index)
        chunks.append(chunk)
    if len(used) != len(objects):
        raise _bad("an object is listed that no chunk uses")
    t = {
        k: _count(totals.get(k), f"totals.{k}")
        for k in ("raw_bytes", "stored_bytes", "chunks", "chunks_new", "chunks_reused", "objects")
    }
    t["bytes_uploaded"] = _count(totals.get("bytes_uploaded", 0), "totals.bytes_uploaded")
    t["files"] = _count(totals.get("files", 0), "totals.files")
    if (
        t["raw_bytes"] != sum(c.raw_size for c in chunks)
        or t["stored_bytes"] != sum(o.size for o in objects)
        or t["chunks"] != len(chunks)
        or t["chunks_new"] + t["chunks_reused"] != len(chunks)
        or t["chunks_new"] != sum(1 for c in chunks if c.new)
        or t["objects"] != len(objects)
    ):
        raise _bad("the totals do not add up")
    return Manifest(
        snapshot_id=doc["snapshot_id"],
        codec=str(doc.get("codec", "")),
        part_size=0,
        parts=[],
        raw_bytes=t["raw_bytes"],
        stored_bytes=t["stored_bytes"],
        files=t["files"],
        sha256=sha256,
        version=2,
        objects=objects,
        chunks=chunks,
        totals=t,
        doc=doc,
    )


def dump_manifest(doc: dict[str, Any]) -> bytes:
    """The bytes of a manifest the control plane writes (gc's repack rewrites manifests)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


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
