"""Part codecs: `none`, `zstd` (CPU: the zstandard package, or the `zstd` binary when the package
cannot be had) and `nvcomp-ans` (GPU, nvidia.nvcomp).

Each part is compressed independently (one zstd frame / one nvCOMP native bitstream), so parts can
be produced, uploaded, downloaded and decoded in any order and in parallel. The codec is recorded per
part: a part that does not shrink by at least MIN_SAVING is stored raw with codec `none`.

A missing compressor never fails a snapshot: `for_snapshot` walks down nvcomp-ans -> zstandard ->
`zstd` binary -> none and says what it skipped and why (`Codec.fallback`), which snapshot.py
records in its result and in the manifest (`source.codec_fallback`, `warnings`).
"""
from __future__ import annotations

import ctypes
import shutil
import threading
from typing import Any, Dict, List, Optional, Tuple

from gs_bootstrap import ensure
from gs_common import ScriptError, read_full
from gs_zstd_cli import ZstdCliCodec

_FALLBACK_CODES = ("missing_dependency", "codec_unavailable")  # "the compressor is not here"

MIN_SAVING = 0.03  # a part must shrink by 3% to be worth a decompression step on restore
PART_CODECS = ("zstd", "nvcomp-ans", "none")  # what a manifest may name for a part
CODEC_NAMES = ("auto",) + PART_CODECS  # what a snapshot config may ask for


class Codec:
    """Interface: compress(raw) -> bytes; decompress(stored, raw_size) -> bytes. Thread-safe.

    checks_output(stored): decompress() itself detects wrong output (an embedded checksum), so
    restore may skip the SHA-256 of the decoded bytes."""

    name = "none"
    # Set by for_snapshot when this codec replaces the one asked for: {"requested", "used", "reasons"}.
    fallback: Optional[Dict[str, Any]] = None

    def checks_output(self, stored: Any) -> bool:
        return True  # `none`: the decoded bytes are the SHA-256-verified stored bytes

    def compress(self, raw: Any) -> Any:
        return raw

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


class ZstdCodec(Codec):
    """zstd via the `zstandard` package; the C code releases the GIL, so threads scale.

    `threads` is zstd's own worker count per part (0 = single-threaded, our default: parallelism
    comes from compressing several parts at once, which keeps memory per part predictable)."""

    name = "zstd"

    def __init__(self, level: int = 3, threads: int = 0, bootstrap: bool = True) -> None:
        self.zstd = ensure("zstandard", "zstandard", install=bootstrap)  # pinned, hash-checked
        self.level = level
        self.threads = threads
        self._local = threading.local()  # zstandard contexts must not be shared between threads

    def _ctx(self) -> Tuple[Any, Any]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            # write_checksum: each frame carries XXH64 of its content, checked by zstd on decode, so
            # restore need not re-hash decoded parts with SHA-256 (stored bytes are SHA-256-checked).
            ctx = (self.zstd.ZstdCompressor(level=self.level, threads=self.threads, write_checksum=True),
                   self.zstd.ZstdDecompressor())
            self._local.ctx = ctx
        return ctx

    def compress(self, raw: Any) -> Any:
        return self._ctx()[0].compress(raw)

    def checks_output(self, stored: Any) -> bool:
        try:  # frames written by this code carry XXH64; older/foreign ones may not
            return bool(self.zstd.get_frame_parameters(stored).has_checksum)
        except self.zstd.ZstdError:
            return False

    def decompress(self, stored: Any, raw_size: int) -> Any:
        try:
            return self._ctx()[1].decompress(stored, max_output_size=raw_size)
        except self.zstd.ZstdError as exc:
            raise ScriptError("part_corrupt", "zstd frame does not decode: %s" % exc) from None

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        # Streaming decode straight into a recycled buffer: no fresh 32 MiB allocation per part.
        try:
            with self._ctx()[1].stream_reader(stored) as reader:
                return read_full(reader, out)
        except self.zstd.ZstdError as exc:
            raise ScriptError("part_corrupt", "zstd frame does not decode: %s" % exc) from None

    def version(self) -> str:
        return str(getattr(self.zstd, "__version__", ""))


class _HostBytes:
    """Expose a bytes-like object through __array_interface__ so nvcomp.as_array can wrap it
    without numpy (zero-copy; keeps a reference so the memory outlives the nvCOMP array)."""

    def __init__(self, data: Any) -> None:
        self._data = data if isinstance(data, bytearray) else bytearray(data)
        self._cbuf = (ctypes.c_ubyte * len(self._data)).from_buffer(self._data)
        self.__array_interface__ = {"shape": (len(self._data),), "typestr": "|u1",
                                    "data": (ctypes.addressof(self._cbuf), False), "version": 3}


class NvcompAnsCodec(Codec):
    """rANS on the GPU via the nvCOMP Python API (`nvidia-nvcomp-cu12`/`-cu13` wheels).

    encode: host bytes -> nvcomp.as_array(...).cuda() -> Codec(algorithm="ANS").encode -> .cpu().
    The native bitstream carries its own header (sizes, chunking), so decode needs no side data."""

    name = "nvcomp-ans"

    def checks_output(self, stored: Any) -> bool:
        return False  # no embedded checksum requested: restore re-hashes the output

    def __init__(self, bootstrap: bool = True, device_id: int = 0) -> None:
        driver = cuda_driver_version()
        if driver is None:
            raise ScriptError("codec_unavailable", "nvcomp-ans needs a CUDA GPU; none is visible")
        major = 13 if driver >= 13000 else 12
        self.nvcomp = ensure("nvidia.nvcomp", "nvidia-nvcomp-cu%d" % major, install=bootstrap)  # pinned
        self.device_id = device_id
        self._local = threading.local()  # nvCOMP: one Codec per thread (documented thread-safety)

    def _codec(self) -> Any:
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self.nvcomp.Codec(algorithm="ANS", device_id=self.device_id, data_type="|u1")
            self._local.codec = codec
        return codec

    def _to_bytes(self, array: Any) -> bytes:
        host = array.cpu()
        pointer = host.__array_interface__["data"][0]
        return ctypes.string_at(pointer, host.buffer_size)

    def compress(self, raw: Any) -> Any:
        device = self.nvcomp.as_array(_HostBytes(raw)).cuda()
        return self._to_bytes(self._codec().encode(device))

    def decompress(self, stored: Any, raw_size: int) -> Any:
        try:
            device = self.nvcomp.as_array(_HostBytes(stored)).cuda()
            out = self._to_bytes(self._codec().decode(device, data_type="|u1"))
        except RuntimeError as exc:
            raise ScriptError("part_corrupt", "nvCOMP ANS decode failed: %s" % exc) from None
        if len(out) != raw_size:
            raise ScriptError("part_corrupt", "nvCOMP ANS decoded %d bytes, expected %d" % (len(out), raw_size))
        return out

    def version(self) -> str:
        return str(getattr(self.nvcomp, "__version__", ""))


def cuda_driver_version() -> Optional[int]:
    """CUDA driver version (e.g. 12040) when libcuda loads and sees at least one device, else None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count, version = ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value
    except (OSError, AttributeError):
        return None


def _zstd(level: int, bootstrap: bool) -> Codec:
    """zstd frames: the zstandard package (imported or installed pinned), else the `zstd` binary."""
    try:
        return ZstdCodec(level=level, bootstrap=bootstrap)
    except ScriptError as exc:
        binary = shutil.which("zstd")
        if exc.code != "missing_dependency":
            raise
        if binary is None:
            raise ScriptError(exc.code, "%s; and no `zstd` binary is on PATH" % exc.message) from None
        codec = ZstdCliCodec(binary, level=level)
        codec.fallback = {"requested": "zstd", "used": "zstd", "implementation": codec.version(),
                          "reasons": [exc.message]}
        return codec


def for_snapshot(name: str, level: int, bootstrap: bool = True) -> Codec:
    """The codec that compresses new parts. `auto` = nvCOMP ANS when a GPU and an importable nvCOMP
    are present (no install attempted), zstd otherwise.

    Whatever is asked for, a compressor that is missing (not installable, no GPU) is replaced by the
    next one down nvcomp-ans -> zstd (package, then binary) -> none, never an error; the returned
    codec's `fallback` says so (None when `auto` simply found no GPU: that is its documented rule)."""
    if name not in CODEC_NAMES:
        raise ScriptError("bad_config", "unknown codec %r (expected one of %s)" % (name, ", ".join(CODEC_NAMES)))
    if name == "none":
        return Codec()
    reasons: List[str] = []
    if name in ("nvcomp-ans", "auto"):
        try:
            return NvcompAnsCodec(bootstrap=bootstrap and name == "nvcomp-ans")
        except ScriptError as exc:
            if exc.code not in _FALLBACK_CODES:
                raise
            if name == "nvcomp-ans":
                reasons.append(exc.message)
    try:
        codec = _zstd(level, bootstrap)
    except ScriptError as exc:
        if exc.code not in _FALLBACK_CODES:
            raise
        codec = Codec()
        reasons.append(exc.message)
    if reasons or codec.fallback:
        reasons += (codec.fallback or {}).get("reasons", [])
        codec.fallback = {"requested": name, "used": codec.name, "implementation": codec.version(),
                          "reasons": reasons}
    return codec


def fallback_warning(codec: Codec) -> Optional[str]:
    """One line for a job result / manifest `warnings`, when the codec is not the one asked for."""
    fb = codec.fallback
    if not fb:
        return None
    used = fb["used"] if fb["used"] != "zstd" else "zstd (%s)" % (fb.get("implementation") or "zstd")
    why = " ".join("; ".join(fb["reasons"]).split())  # one line: pip's errors span several
    return "codec %s was asked for; parts are stored with %s because: %s" % (fb["requested"], used, why[:1000])


def for_restore(names: Any, bootstrap: bool = True) -> Dict[str, Codec]:
    """Decoders for every codec named in a manifest (so a missing one fails before any download).
    zstd parts decode with the zstandard package or, without it, the `zstd` binary (same frames)."""
    out: Dict[str, Codec] = {}
    for name in sorted(set(names)):
        if name not in PART_CODECS:
            raise ScriptError("manifest_invalid", "unknown part codec %r" % name)
        if name == "none":
            out[name] = Codec()
        elif name == "zstd":
            out[name] = _zstd(3, bootstrap)
        else:
            out[name] = NvcompAnsCodec(bootstrap=bootstrap)
    return out


def encode_part(codec: Codec, raw: Any) -> Tuple[str, Any]:
    """(codec name, stored bytes) for one part; falls back to raw when the saving is under 3%."""
    if codec.name == "none" or not len(raw):
        return "none", raw
    stored = codec.compress(raw)
    if len(stored) > len(raw) * (1.0 - MIN_SAVING):
        return "none", raw
    return codec.name, stored
