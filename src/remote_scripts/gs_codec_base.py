"""The part codec interface, shared by gs_codecs (CPU codecs, selection), gs_planes (byte planes) and
gs_nvcomp (GPU), so those modules need not import each other."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple


class Codec:
    """Interface: compress(raw) -> bytes; decompress(stored, raw_size) -> bytes. Thread-safe.

    encode(raw) -> (part codec name, stored): what the manifest records for this part. A codec may
    store a part with another codec than its own name (the GPU codec falls back to zstd for a part on
    a CUDA error; `auto` picks zstd or zstd-planes per part), so callers record the name returned.

    checks_output(stored): decompress() itself detects wrong output (an embedded checksum), so
    restore may skip the SHA-256 of the decoded bytes."""

    name = "none"
    # Set by for_snapshot when this codec replaces the one asked for: {"requested", "used", "reasons"}.
    fallback: Optional[Dict[str, Any]] = None
    requires_gpu = False  # parts it writes can only be decoded on a GPU (no CPU decoder exists)
    # Decoding ANY bytes is memory-safe and bounded by the output buffer (a CPU decoder that checks
    # its input), so a reader that verifies the decoded bytes' SHA-256 anyway may skip the stored
    # bytes' one: damage shows as a decode error or as the wrong raw digest (gs_fetch2).
    decodes_untrusted_input = False

    def checks_output(self, stored: Any) -> bool:
        return True  # `none`: the decoded bytes are the SHA-256-verified stored bytes

    def compress(self, raw: Any) -> Any:
        return raw

    def encode(self, raw: Any) -> Tuple[str, Any]:
        return self.name, self.compress(raw)

    def decompress(self, stored: Any, raw_size: int) -> Any:
        return stored

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        """Decode into `out`; returns the byte count (len(out) means "maybe more": the caller gives
        one spare byte so an over-long part shows as a size mismatch)."""
        data = self.decompress(stored, len(out))
        n = min(len(data), len(out))
        out[:n] = memoryview(data)[:n]
        return len(data)

    def version(self) -> str:
        return ""
