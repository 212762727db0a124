"""`zstd-planes`: a part split into byte planes, each plane one zstd frame.

bf16/fp16 weights are 2-byte little-endian elements: the high byte (sign and exponent, plus one
mantissa bit for bf16) takes few values, the low byte (mantissa) is close to random. Interleaved, zstd
sees neither pattern well (~1.3x on real bf16 weights); split into a high-byte and a low-byte plane it
codes the exponents on their own (docs/benchmarks.md has the numbers).

Stored form (all integers big-endian):
    magic b"GSP1" | element width (1 byte, 2) | raw length (8) | length of plane 0's frame (8)
    | plane 0 frame | plane 1 frame
Plane k holds bytes k, k+width, k+2*width... of the part, so an odd length needs no special case
(plane 0 is one byte longer). Each frame carries zstd's XXH64 content checksum, so a decode checks its
own output, like plain zstd parts. The magic is not a zstd frame magic: plain zstd refuses this form
rather than returning the planes concatenated.

`AutoCpuCodec` (what `auto` is on a CPU host) stores each part as zstd or zstd-planes, whichever is
smaller on a sample of the part: a few slices, about 3% of a 32 MiB part compressed twice. A part
whose sample zstd cannot shrink by 1% is stored raw without compressing the rest of it.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Dict, List, Optional, Tuple

from gs_codec_base import Codec
from gs_common import ScriptError, read_full

MAGIC = b"GSP1"
_HEAD = struct.Struct(">4sBQQ")
WIDTH = 2
CHUNK = 1 << 20  # bytes split or joined at a time (even)
SAMPLE_SLICES, SAMPLE_BYTES = 4, 256 << 10  # what auto compresses both ways per part
PLANES_MIN_WIN = 0.02  # planes must beat plain zstd by 2% on the sample to be chosen
INCOMPRESSIBLE = 0.01  # a sample zstd shrinks by less than 1%: the part is stored raw, uncompressed


class PlanesCodec(Codec):
    """zstd per byte plane (the zstandard package; its C code releases the GIL, so threads scale).

    Planes are split and joined CHUNK bytes at a time (bytes/bytearray slicing with a step runs at
    about 2 GB/s in C, a strided memoryview at a tenth of that), so a part costs a few MiB of
    scratch, not another copy of itself. `level` None: zstd's fast strategy with min_match 7 and a
    64-entry hash table. On these planes matches hardly pay: the fewer zstd looks for, the more
    bytes go to its Huffman literal coder, which is what codes the sign/exponent plane well (on
    N(0, 0.02) bf16: ratio 2.94 for that plane at ~860 MB/s of part, vs 2.71 and ~450 MB/s at zstd
    level 1, and 2.36 at level 3). A number: that zstd level."""

    decodes_untrusted_input = True  # zstd checks every frame it reads; output bounded by the buffer

    name = "zstd-planes"

    def __init__(self, zstd_module: Any, level: Optional[int] = None) -> None:
        self.zstd = zstd_module
        self.level = level
        self._local = threading.local()

    def _params(self) -> Dict[str, Any]:
        if self.level is not None:
            return {"level": self.level, "write_checksum": True}
        return {
            "compression_params": self.zstd.ZstdCompressionParameters(
                window_log=17,
                hash_log=6,
                chain_log=6,
                search_log=1,
                min_match=7,
                target_length=0,
                strategy=self.zstd.STRATEGY_FAST,
                write_checksum=1,
            )
        }

    def _ctx(self) -> Tuple[Any, Any, Any, Any]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:  # one context per plane: both streams are open at once
            ctx = (
                self.zstd.ZstdCompressor(**self._params()),
                self.zstd.ZstdCompressor(**self._params()),
                self.zstd.ZstdDecompressor(),
                self.zstd.ZstdDecompressor(),
            )
            self._local.ctx = ctx
        return ctx

    def checks_output(self, stored: Any) -> bool:
        return True  # both frames carry XXH64 of their plane

    def compress(self, raw: Any) -> Any:
        view = memoryview(raw).cast("B")
        n = len(view)
        c0, c1 = self._ctx()[:2]
        objs = [c.compressobj(size=(n - k + WIDTH - 1) // WIDTH) for k, c in enumerate((c0, c1))]
        out: List[List[bytes]] = [[], []]
        for offset in range(0, n, CHUNK):  # CHUNK is even: plane k stays at bytes k, k+2, ...
            chunk = view[offset : offset + CHUNK].tobytes()
            for k in range(WIDTH):
                out[k].append(objs[k].compress(chunk[k::WIDTH]))
        frames = [b"".join(out[k] + [objs[k].flush()]) for k in range(WIDTH)]
        return b"".join([_HEAD.pack(MAGIC, WIDTH, n, len(frames[0]))] + frames)

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        view = memoryview(stored).cast("B")
        if len(view) < _HEAD.size:
            raise ScriptError("part_corrupt", "zstd-planes part is shorter than its header")
        magic, width, raw_len, first = _HEAD.unpack(view[: _HEAD.size])
        if magic != MAGIC or width != WIDTH or _HEAD.size + first > len(view):
            raise ScriptError("part_corrupt", "zstd-planes part has a bad header")
        if raw_len >= len(out):  # longer than the caller expects: say so without decoding
            return raw_len
        d0, d1 = self._ctx()[2:]
        try:
            readers = [
                d0.stream_reader(view[_HEAD.size : _HEAD.size + first]),
                d1.stream_reader(view[_HEAD.size + first :]),
            ]
            scratch = bytearray(CHUNK)
            planes = [bytearray(CHUNK // WIDTH) for _ in range(WIDTH)]
            for offset in range(0, raw_len, CHUNK):
                size = min(CHUNK, raw_len - offset)
                for k in range(WIDTH):
                    want = (size - k + WIDTH - 1) // WIDTH
                    plane = memoryview(planes[k])[:want]
                    if read_full(readers[k], plane) != want:
                        raise ScriptError("part_corrupt", "zstd-planes plane %d ends early" % k)
                    scratch[k:size:WIDTH] = plane
                out[offset : offset + size] = memoryview(scratch)[:size]
            for k in range(WIDTH):  # reading to the end makes zstd check the frame's checksum
                if readers[k].read(1):
                    raise ScriptError("part_corrupt", "zstd-planes plane %d is longer than the part" % k)
        except self.zstd.ZstdError as exc:
            raise ScriptError("part_corrupt", "zstd-planes frame does not decode: %s" % exc) from None
        return raw_len

    def decompress(self, stored: Any, raw_size: int) -> Any:
        out = bytearray(raw_size + 1)
        n = self.decompress_into(stored, memoryview(out))
        if n != raw_size:
            raise ScriptError("part_corrupt", "zstd-planes part decodes to %d bytes, expected %d" % (n, raw_size))
        return bytes(out[:n])

    def version(self) -> str:
        return str(getattr(self.zstd, "__version__", ""))


def sample(raw: Any) -> bytes:
    """SAMPLE_SLICES even-aligned slices spread over the part (all of it when small)."""
    view = memoryview(raw)
    if len(view) <= SAMPLE_SLICES * SAMPLE_BYTES:
        return view.tobytes()
    step = (len(view) - SAMPLE_BYTES) // (SAMPLE_SLICES - 1)
    return b"".join(view[o : o + SAMPLE_BYTES].tobytes() for o in (i * step & ~1 for i in range(SAMPLE_SLICES)))


class AutoCpuCodec(Codec):
    """Per part: zstd-planes when it wins on the sample, else plain zstd. Named `zstd` (the snapshot's
    codec); each part records the one used."""

    decodes_untrusted_input = True  # zstd checks every frame it reads; output bounded by the buffer

    name = "zstd"

    def __init__(self, zstd_codec: Codec, planes: PlanesCodec) -> None:
        self.zstd, self.planes = zstd_codec, planes
        self.fallback = zstd_codec.fallback

    def choose(self, raw: Any) -> Optional[Codec]:
        """The codec for this part from its sample, or None when the sample does not shrink by
        INCOMPRESSIBLE with zstd (random or already compressed data: compressing the whole part would
        only burn CPU, and the part would be stored raw anyway under MIN_SAVING)."""
        probe = sample(raw)
        if len(probe) < 4096:
            return self.zstd
        plain = len(self.zstd.compress(probe))
        if plain > len(probe) * (1.0 - INCOMPRESSIBLE):
            return None
        return self.planes if len(self.planes.compress(probe)) < plain * (1.0 - PLANES_MIN_WIN) else self.zstd

    def encode(self, raw: Any) -> Tuple[str, Any]:
        codec = self.choose(raw)
        if codec is None:
            return "none", raw
        return codec.name, codec.compress(raw)

    def compress(self, raw: Any) -> Any:
        return self.encode(raw)[1]

    def checks_output(self, stored: Any) -> bool:
        if bytes(memoryview(stored)[:4]) == MAGIC:
            return True
        return self.zstd.checks_output(stored)

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        codec = self.planes if bytes(memoryview(stored)[:4]) == MAGIC else self.zstd
        return codec.decompress_into(stored, out)

    def decompress(self, stored: Any, raw_size: int) -> Any:
        codec = self.planes if bytes(memoryview(stored)[:4]) == MAGIC else self.zstd
        return codec.decompress(stored, raw_size)

    def version(self) -> str:
        return self.zstd.version()
