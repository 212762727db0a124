"""Pack objects of the chunk store (format 2), as the control plane reads and writes them (gc's repack):
`<stored chunk bytes>... <TOC JSON utf-8> <8-byte big-endian TOC length> b"GSPACK01"`, TOC
{"format": "gpusnap-pack", "version": 1, "chunks": [[raw_sha256, offset, stored_size, raw_size, codec,
sha256_of_stored], ...]}. The host writes the same layout (src/remote_scripts); docs/data-plane.md."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

MAGIC = b"GSPACK01"
FOOTER = 16


@dataclass(frozen=True)
class PackEntry:
    raw_sha256: str
    offset: int
    stored_size: int
    raw_size: int
    codec: str
    sha256: str  # of the stored bytes


def build_pack(chunks: list[tuple[PackEntry, bytes]]) -> tuple[bytes, list[PackEntry]]:
    """A pack of `chunks` ((entry, stored bytes); the entries' offsets are ignored and set here). Returns
    the pack's bytes and its entries with their offsets in it."""
    body, entries, offset = [], [], 0
    for entry, data in chunks:
        if hashlib.sha256(data).hexdigest() != entry.sha256 or len(data) != entry.stored_size:
            raise ValueError(f"chunk {entry.raw_sha256} does not match its entry")
        entries.append(
            PackEntry(entry.raw_sha256, offset, entry.stored_size, entry.raw_size, entry.codec, entry.sha256)
        )
        body.append(data)
        offset += len(data)
    toc = json.dumps(
        {
            "format": "gpusnap-pack",
            "version": 1,
            "chunks": [[e.raw_sha256, e.offset, e.stored_size, e.raw_size, e.codec, e.sha256] for e in entries],
        },
        separators=(",", ":"),
    ).encode()
    return b"".join(body) + toc + struct.pack(">Q", len(toc)) + MAGIC, entries


def read_toc(pack: bytes) -> list[PackEntry]:
    """The entries of a whole pack object. Raises ValueError when it is not a pack."""
    if len(pack) < FOOTER or pack[-8:] != MAGIC:
        raise ValueError("not a gpusnap pack (no footer)")
    (toc_len,) = struct.unpack(">Q", pack[-FOOTER:-8])
    if toc_len > len(pack) - FOOTER:
        raise ValueError("the pack's TOC length is out of range")
    doc = json.loads(pack[len(pack) - FOOTER - toc_len : -FOOTER])
    if doc.get("format") != "gpusnap-pack" or doc.get("version") != 1:
        raise ValueError("not a gpusnap-pack version 1 TOC")
    return [PackEntry(str(r[0]), int(r[1]), int(r[2]), int(r[3]), str(r[4]), str(r[5])) for r in doc["chunks"]]
