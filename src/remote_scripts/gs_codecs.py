"""Part codecs: `none`, `zstd` (CPU: the zstandard package, or the `zstd` binary when the package
cannot be had), `zstd-planes` (bytes split into planes, then zstd: gs_planes) and `nvcomp-ans` (GPU,
nvidia.nvcomp: gs_nvcomp).

Each part is compressed independently (one zstd frame / one nvCOMP native bitstream), so parts can
be produced, uploaded, downloaded and decoded in any order and in parallel. The codec is recorded per
part: a part that does not shrink by at least MIN_SAVING is stored raw with codec `none`.

A missing compressor never fails a snapshot: `for_snapshot` walks down nvcomp-ans -> zstandard ->
`zstd` binary -> none and says what it skipped and why (`Codec.fallback`), which snapshot.py
records in its result and in the manifest (`source.codec_fallback`, `warnings`). A GPU that fails on
one part after selection stores that part with the CPU codec (gs_nvcomp).

`nvcomp-ans` parts have no CPU decoder: `decode_requirements` says so for the manifest
(`decode.requires_gpu`, `decode.nvcomp_major`), and `for_restore` refuses up front with `gpu_required`
on a host that cannot decode them, before anything is downloaded.
"""

from __future__ import annotations

import shutil
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from gs_bootstrap import ensure
from gs_codec_base import Codec
from gs_common import ScriptError, read_full
from gs_nvcomp import NVCOMP_MAJOR, NvcompAnsCodec, cuda_driver_version  # noqa: F401 - re-exported
from gs_planes import AutoCpuCodec, PlanesCodec
from gs_zstd_cli import ZstdCliCodec

_FALLBACK_CODES = ("missing_dependency", "codec_unavailable")  # "the compressor is not here"

MIN_SAVING = 0.03  # a part must shrink by 3% to be worth a decompression step on restore
PART_CODECS = ("zstd", "zstd-planes", "nvcomp-ans", "none")  # what a manifest may name for a part
GPU_ONLY_CODECS = ("nvcomp-ans",)  # no CPU decoder exists for these
CODEC_NAMES = ("auto",) + PART_CODECS  # what a snapshot config may ask for


class ZstdCodec(Codec):
    """zstd via the `zstandard` package; the C code releases the GIL, so threads scale.

    `threads` is zstd's own worker count per part (0 = single-threaded, our default: parallelism
    comes from compressing several parts at once, which keeps memory per part predictable)."""

    decodes_untrusted_input = True  # zstd checks every frame it reads; output bounded by the buffer

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
            ctx = (
                self.zstd.ZstdCompressor(level=self.level, threads=self.threads, write_checksum=True),
                self.zstd.ZstdDecompressor(),
            )
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
            # A frame header may claim any content size, which decompress() would allocate at once
            # (a damaged header: MemoryError, not part_corrupt). Refuse a claim past what we expect.
            claimed = self.zstd.get_frame_parameters(stored).content_size
            if claimed not in (self.zstd.CONTENTSIZE_UNKNOWN, self.zstd.CONTENTSIZE_ERROR) and claimed > raw_size:
                raise ScriptError(
                    "part_corrupt", "zstd frame claims %d bytes, expected at most %d" % (claimed, raw_size)
                )
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
        codec.fallback = {
            "requested": "zstd",
            "used": "zstd",
            "implementation": codec.version(),
            "reasons": [exc.message],
        }
        return codec


def _planes(bootstrap: bool) -> PlanesCodec:
    """zstd-planes needs the zstandard package (one CLI process per plane would cost more than it saves)."""
    return PlanesCodec(ensure("zstandard", "zstandard", install=bootstrap))


def _cpu(name: str, level: int, bootstrap: bool) -> Codec:
    """The CPU codec for `name` (zstd, zstd-planes, or auto's per-part choice between the two)."""
    codec = _zstd(level, bootstrap)
    if name == "zstd" or not isinstance(codec, ZstdCodec):  # no zstandard package: plain zstd frames only
        if name == "zstd-planes":
            codec.fallback = {
                "requested": name,
                "used": "zstd",
                "implementation": codec.version(),
                "reasons": ["zstd-planes needs the zstandard package"] + (codec.fallback or {}).get("reasons", []),
            }
        return codec
    planes = PlanesCodec(codec.zstd)  # its own fast settings (gs_planes), whatever zstd's level
    return planes if name == "zstd-planes" else AutoCpuCodec(codec, planes)


def for_snapshot(
    name: str,
    level: int,
    bootstrap: bool = True,
    *,
    part_size: int = 32 << 20,
    parallelism: int = 4,
    gpu_probe: Any = None,
) -> Codec:
    """The codec that compresses new parts. `auto` = nvCOMP ANS when a usable GPU (gs_gpu: free memory
    for `parallelism` parts of `part_size`, compute mode) and an importable nvCOMP 6 are present (no
    install attempted) and a round trip on it works; otherwise zstd or zstd-planes, per part.

    Whatever is asked for, a compressor that is missing (not installable, no GPU) is replaced by the
    next one down nvcomp-ans -> zstd (package, then binary) -> none, never an error; the returned
    codec's `fallback` says so (None when `auto` simply found no GPU: that is its documented rule)."""
    if name not in CODEC_NAMES:
        raise ScriptError("bad_config", "unknown codec %r (expected one of %s)" % (name, ", ".join(CODEC_NAMES)))
    if name == "none":
        return Codec()
    reasons: List[str] = []
    cpu_name = "auto" if name in ("auto", "nvcomp-ans") else name
    if name in ("nvcomp-ans", "auto"):
        try:
            return NvcompAnsCodec(
                bootstrap=bootstrap and name == "nvcomp-ans",
                part_size=part_size,
                parallelism=parallelism,
                probe=gpu_probe,
                cpu_fallback=lambda: _cpu(cpu_name, level, bootstrap),
            )
        except ScriptError as exc:
            if exc.code not in _FALLBACK_CODES:
                raise
            if name == "nvcomp-ans":
                reasons.append(exc.message)
    try:
        codec = _cpu(cpu_name, level, bootstrap)
    except ScriptError as exc:
        if exc.code not in _FALLBACK_CODES:
            raise
        codec = Codec()
        reasons.append(exc.message)
    if reasons or codec.fallback:
        reasons += (codec.fallback or {}).get("reasons", [])
        codec.fallback = {"requested": name, "used": codec.name, "implementation": codec.version(), "reasons": reasons}
    return codec


def fallback_warning(codec: Codec) -> Optional[str]:
    """One line for a job result / manifest `warnings`, when the codec is not the one asked for."""
    fb = codec.fallback
    if not fb:
        return None
    used = fb["used"] if fb["used"] != "zstd" else "zstd (%s)" % (fb.get("implementation") or "zstd")
    if fb.get("parts_on_cpu"):
        used = "%s (%d part(s) on the CPU)" % (used, fb["parts_on_cpu"])
    why = " ".join("; ".join(fb["reasons"]).split())  # one line: pip's errors span several
    return "codec %s was asked for; parts are stored with %s because: %s" % (fb["requested"], used, why[:1000])


def for_restore(names: Any, bootstrap: bool = True, *, gpu_probe: Any = None) -> Dict[str, Codec]:
    """Decoders for every codec named in a manifest (so a missing one fails before any download).
    zstd parts decode with the zstandard package or, without it, the `zstd` binary (same frames).
    nvcomp-ans parts need this host's GPU: `gpu_required` when it cannot decode them."""
    out: Dict[str, Codec] = {}
    for name in sorted(set(names)):
        if name not in PART_CODECS:
            raise ScriptError("manifest_invalid", "unknown part codec %r" % name)
        if name == "none":
            out[name] = Codec()
        elif name == "zstd":
            out[name] = _zstd(3, bootstrap)
        elif name == "zstd-planes":
            out[name] = _planes(bootstrap)
        else:
            try:
                out[name] = NvcompAnsCodec(bootstrap=bootstrap, probe=gpu_probe, decode_only=True)
            except ScriptError as exc:
                if exc.code not in _FALLBACK_CODES:
                    raise
                raise ScriptError(
                    "gpu_required",
                    "the snapshot has parts compressed with nvCOMP %d ANS, which "
                    "only a CUDA GPU can decode, and this host cannot: %s. Restore it on a host "
                    "with an NVIDIA GPU (CUDA 12+, Python 3.9+)" % (NVCOMP_MAJOR, exc.message),
                ) from None
    return out


def decode_requirements(part_codecs: Iterable[str]) -> Dict[str, Any]:
    """What a restore host needs to decode these parts (the manifest's `decode` object)."""
    gpu = sorted(set(part_codecs) & set(GPU_ONLY_CODECS))
    out: Dict[str, Any] = {"requires_gpu": bool(gpu)}
    if gpu:
        out["nvcomp_major"] = NVCOMP_MAJOR
    return out


def encode_part(codec: Codec, raw: Any) -> Tuple[str, Any]:
    """(codec name, stored bytes) for one part; falls back to raw when the saving is under 3%."""
    if codec.name == "none" or not len(raw):
        return "none", raw
    encode = getattr(codec, "encode", None)  # ZstdCliCodec has no encode: its parts are its own name
    name, stored = encode(raw) if encode else (codec.name, codec.compress(raw))
    if name == "none" or len(stored) > len(raw) * (1.0 - MIN_SAVING):
        return "none", raw
    return name, stored
