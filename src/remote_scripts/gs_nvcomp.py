"""`nvcomp-ans`: rANS on the GPU via the nvCOMP Python API (`nvidia-nvcomp-cu12`/`-cu13` wheels, 6.x).

API used (docs.nvidia.com/cuda/nvcomp/py_api.html and samples/nvcomp.html): `nvcomp.as_array(obj)`
wraps a host buffer exposing __array_interface__ (zero-copy); `.cuda()` / `.cpu()` copy between host
and device; `Codec(algorithm="ANS", device_id=...)` encodes and decodes device arrays and must be used
by the thread that made it; a host Array exposes `__array_interface__` and `buffer_size`. The native
bitstream carries its own header (sizes, chunking), so decode needs no side data.

What can go wrong on a real rented box, and what this module does about it:
- the GPU is busy (a training job holds its memory) or in an exclusive compute mode: NVML is asked
  first (gs_gpu) and the device with the most free memory is used; a few KiB are round-tripped at
  selection; a CUDA error while compressing a part stores that part with the CPU codec instead;
- on decode a CUDA error is `gpu_error` (the host's fault), not `part_corrupt` (the part's);
- NVIDIA wheels on torch images ship `nvidia/__init__.py`, which makes `nvidia` a regular package that
  hides a bootstrapped `nvidia/nvcomp`: the package path is extended;
- nvCOMP 5.x and 6.x cannot read each other's ANS streams (nvCOMP 6.0.0 release notes: ANS changed;
  nvCOMPDx 0.2.0's: its ANS "is only interoperable with nvCOMP 6.0 or newer"): only major 6 is used
  (NVCOMP_MAJOR), and the manifest records it (gs_codecs.decode_requirements).

Not built: a weights-aware GPU variant. nvCOMP's ANS has a (b)float16 mode (`data_type="<f2"`), the
GPU counterpart of zstd-planes; it changes the stream format, so it needs a GPU run to be added.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Tuple

from gs_bootstrap import ensure
from gs_codec_base import Codec
from gs_common import ScriptError
from gs_gpu import CONTEXT_BYTES, GpuProbe, choose, needed_bytes

logger = logging.getLogger("gpusnap.remote")

NVCOMP_MAJOR = 6  # the ANS stream format we write and read; pinned `>=6,<7` (gs_bootstrap._NVCOMP)
_PROBE = bytes(range(256)) * 8 + b"\x00" * 2048  # 4 KiB round-tripped at selection
# Errors nvCOMP's bindings raise: RuntimeError (std::runtime_error: CUDA and nvCOMP status errors),
# MemoryError (std::bad_alloc), ValueError (std::invalid_argument).
_NVCOMP_ERRORS = (RuntimeError, MemoryError, ValueError, OSError)
_CUDA_WORDS = ("cuda", "out of memory", "driver", "busy or unavailable", "launch failure")


class _HostBytes:
    """Expose a bytes-like object through __array_interface__ so nvcomp.as_array can wrap it
    without numpy (zero-copy; keeps a reference so the memory outlives the nvCOMP array)."""

    def __init__(self, data: Any) -> None:
        self._data = data if isinstance(data, bytearray) else bytearray(data)
        self._cbuf = (ctypes.c_ubyte * len(self._data)).from_buffer(self._data)
        self.__array_interface__ = {
            "shape": (len(self._data),),
            "typestr": "|u1",
            "data": (ctypes.addressof(self._cbuf), False),
            "version": 3,
        }


def is_cuda_error(exc: BaseException) -> bool:
    """A failure of the GPU or its driver (out of memory, device busy...), not of the stream."""
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _CUDA_WORDS)


def _extend_nvidia_path() -> None:
    """Let `nvidia.nvcomp` be found in every `nvidia/` directory on sys.path, also when an older wheel's
    `nvidia/__init__.py` made `nvidia` a regular package (whose __path__ is only its own directory)."""
    try:
        pkg = importlib.import_module("nvidia")
    except (ImportError, OSError):
        return
    path = getattr(pkg, "__path__", None)
    if path is None:
        return
    for entry in list(sys.path):
        candidate = os.path.join(entry or ".", "nvidia")
        if os.path.isdir(os.path.join(candidate, "nvcomp")) and candidate not in list(path):
            path.append(candidate)
    importlib.invalidate_caches()


def import_nvcomp(driver: int, bootstrap: bool) -> Any:
    """nvidia.nvcomp, major NVCOMP_MAJOR, imported or installed (pinned) for this driver's CUDA major.
    Raises ScriptError(codec_unavailable | missing_dependency)."""
    if sys.version_info < (3, 9):
        raise ScriptError(
            "codec_unavailable",
            "nvCOMP %d needs Python >= 3.9; this host runs %d.%d" % ((NVCOMP_MAJOR,) + tuple(sys.version_info[:2])),
        )
    requirement = "nvidia-nvcomp-cu%d" % (13 if driver >= 13000 else 12)
    _extend_nvidia_path()
    try:
        module = ensure("nvidia.nvcomp", requirement, install=bootstrap)
    except ScriptError as exc:
        if exc.code != "missing_dependency":
            raise
        _extend_nvidia_path()  # pip put it next to a regular `nvidia` package that hid it
        try:
            module = importlib.import_module("nvidia.nvcomp")
        except ImportError:
            raise exc from None
        except OSError as load:  # the package is there but its shared library does not load
            raise ScriptError("missing_dependency", "nvCOMP's library does not load: %s" % load) from None
    version = str(getattr(module, "__version__", ""))
    if version.split(".")[0] != str(NVCOMP_MAJOR):
        raise ScriptError(
            "codec_unavailable",
            "nvCOMP %s is installed; gpusnap reads and writes nvCOMP %d "
            "ANS streams only (5.x and 6.x cannot read each other's)" % (version or "?", NVCOMP_MAJOR),
        )
    return module


class NvcompAnsCodec(Codec):
    """The GPU codec. `cpu_fallback` (a factory) makes the codec a part is stored with when the GPU
    fails on it; `decode_only` (restore) skips the free-memory rule, which is for compressing next to
    a user's job, and lets the round trip decide."""

    name = "nvcomp-ans"
    requires_gpu = True

    def __init__(
        self,
        bootstrap: bool = True,
        device_id: Optional[int] = None,
        *,
        part_size: int = 32 << 20,
        parallelism: int = 4,
        probe: Any = None,
        cpu_fallback: Optional[Callable[[], Codec]] = None,
        decode_only: bool = False,
    ) -> None:
        probe = probe or GpuProbe()
        driver = probe.driver_version()
        if driver is None:
            raise ScriptError("codec_unavailable", "nvcomp-ans needs a CUDA GPU; none is visible")
        devices = probe.devices()
        if device_id is None and devices is not None:
            device_id, why = choose(devices, CONTEXT_BYTES if decode_only else needed_bytes(part_size, parallelism))
            if device_id is None:
                raise ScriptError("codec_unavailable", "no GPU can take nvCOMP now: %s" % "; ".join(why))
        self._probe = probe
        self.device_id = 0 if device_id is None else device_id  # no NVML: device 0, the round trip decides
        self.nvcomp = import_nvcomp(driver, bootstrap)
        self._local = threading.local()  # nvCOMP: one Codec per thread (documented thread-safety)
        self._cpu_fallback = cpu_fallback
        self._cpu: Optional[Codec] = None
        self._lock = threading.Lock()
        self.parts_on_cpu = 0
        self._round_trip()

    def _round_trip(self) -> None:
        try:
            out = self.decompress(self.compress(_PROBE), len(_PROBE))
        except _NVCOMP_ERRORS + (ScriptError,) as exc:
            raise ScriptError(
                "codec_unavailable",
                "nvCOMP ANS round trip on GPU %d failed: %s" % (self.device_id, getattr(exc, "message", None) or exc),
            ) from None
        if bytes(out) != _PROBE:
            raise ScriptError("codec_unavailable", "nvCOMP ANS round trip on GPU %d gave other bytes" % self.device_id)

    def checks_output(self, stored: Any) -> bool:
        return False  # no embedded checksum requested: restore re-hashes the output

    def _codec(self) -> Any:
        codec = getattr(self._local, "codec", None)
        if codec is None:
            # `.cuda()` copies to the calling thread's current device: make it ours, in every thread.
            if not self._probe.make_current(self.device_id):
                raise RuntimeError("CUDA error: cannot make GPU %d current in this thread" % self.device_id)
            codec = self.nvcomp.Codec(algorithm="ANS", device_id=self.device_id, data_type="|u1")
            self._local.codec = codec
        return codec

    def compress(self, raw: Any) -> Any:
        codec = self._codec()  # first: it makes our GPU current for the copy below
        host = codec.encode(self.nvcomp.as_array(_HostBytes(raw)).cuda()).cpu()
        return ctypes.string_at(host.__array_interface__["data"][0], host.buffer_size)

    def encode(self, raw: Any) -> Tuple[str, Any]:
        try:
            return self.name, self.compress(raw)
        except _NVCOMP_ERRORS as exc:  # e.g. the user's job took the GPU memory since selection
            reason = "GPU %d failed on a part (%s); stored with the CPU codec" % (self.device_id, exc)
        with self._lock:
            self.parts_on_cpu += 1
            if self._cpu is None:
                try:
                    self._cpu = self._cpu_fallback() if self._cpu_fallback else Codec()
                except ScriptError:  # no CPU compressor either: the part is stored raw
                    self._cpu = Codec()
            cpu = self._cpu
            fb = self.fallback or {
                "requested": self.name,
                "used": "%s and %s" % (self.name, cpu.name),
                "implementation": self.version(),
                "reasons": [],
            }
            if len(fb["reasons"]) < 3:
                fb["reasons"].append(reason)
            fb["parts_on_cpu"] = self.parts_on_cpu
            self.fallback = fb
        logger.warning("%s", reason)
        encode = getattr(cpu, "encode", None)
        return encode(raw) if encode else (cpu.name, cpu.compress(raw))

    def _decode(self, stored: Any) -> Any:
        """The decoded part as an nvCOMP host array."""
        try:
            codec = self._codec()
            return codec.decode(self.nvcomp.as_array(_HostBytes(stored)).cuda(), data_type="|u1").cpu()
        except _NVCOMP_ERRORS as exc:
            if is_cuda_error(exc):
                raise ScriptError(
                    "gpu_error", "GPU %d failed decoding an nvCOMP ANS part: %s" % (self.device_id, exc)
                ) from None
            raise ScriptError("part_corrupt", "nvCOMP ANS decode failed: %s" % exc) from None

    def decompress_into(self, stored: Any, out: memoryview) -> int:
        # Own implementation, not Codec's: the caller's buffer is one byte longer than the part (to
        # see an over-long part), so the decoded length is compared by the caller, not here.
        host = self._decode(stored)
        n = int(host.buffer_size)
        take = min(n, len(out))
        if take:
            target = (ctypes.c_char * len(out)).from_buffer(out)
            ctypes.memmove(target, host.__array_interface__["data"][0], take)
        return n

    def decompress(self, stored: Any, raw_size: int) -> Any:
        host = self._decode(stored)
        if host.buffer_size != raw_size:
            raise ScriptError("part_corrupt", "nvCOMP ANS decoded %d bytes, expected %d" % (host.buffer_size, raw_size))
        return ctypes.string_at(host.__array_interface__["data"][0], host.buffer_size)

    def version(self) -> str:
        return str(getattr(self.nvcomp, "__version__", ""))


def cuda_driver_version() -> Optional[int]:
    """CUDA driver version (e.g. 12040) when libcuda loads and sees at least one device, else None."""
    return GpuProbe().driver_version()
