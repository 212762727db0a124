"""A CPU stand-in for `nvidia.nvcomp` (nvCOMP 6's Python API), strict where gs_nvcomp relies on it.

Written from NVIDIA's Python API reference (https://docs.nvidia.com/cuda/nvcomp/py_api.html) and its
"nvCOMP Python API Basics" sample (https://docs.nvidia.com/cuda/nvcomp/samples/nvcomp.html):
- `as_array(obj)` wraps an object exposing `__array_interface__` (host) or `__cuda_array_interface__`;
  a host Array has `__array_interface__`, a device Array only `__cuda_array_interface__`;
  `buffer_size` is the byte size; `.cuda()` copies to the device, `.cpu()` back to the host. Which
  device: the calling thread's current CUDA device (an assumption: the API takes no device there).
- `Codec(algorithm=..., device_id=..., ...)`: "Each thread must create and use its own Codec
  instance" (Thread-safety guarantees): using one from another thread raises here.
- `encode(array)` / `decode(array, data_type=...)` take and return device arrays here (gs_nvcomp
  always moves data to the device first); the native bitstream carries the decoded size.
- errors surface as RuntimeError (pybind11's translation of std::runtime_error, which nvCOMP throws
  for CUDA and nvCOMP status errors).
The "GPU" is `STATE`: its devices (memory that `.cuda()` and encode/decode take while they run), and
faults a test injects (an out-of-memory error on the next encode or decode, a 5.x stream format).
The compressed form is zlib behind a header naming the format's major version, so a 5.x stream
does not decode with 6.x and the other way round, like the real ANS format.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import zlib
from typing import Any

__version__ = "6.0.0"
__cuda_version__ = 12090
_HEADER = struct.Struct("<8sIQ")  # magic, format major, decoded size

STATE: dict[str, Any] = {}
_CURRENT = threading.local()  # the calling thread's current CUDA device (FakeProbe.make_current sets it)


def reset(devices: int = 1, free: int = 8 << 30) -> None:
    _CURRENT.__dict__.clear()  # the calling thread's current device is 0 again
    STATE.clear()
    STATE.update(
        free={i: free for i in range(devices)}, fail_encode=0, fail_decode=0, format_major=6, encodes=0, decodes=0
    )


reset()


class Array:
    def __init__(self, data: bytes, device: int | None) -> None:
        self._data = data
        self._device = device
        self.buffer_size = len(data)
        if device is None:
            self._cbuf = ctypes.create_string_buffer(data, len(data) or 1)
            self.__array_interface__ = {
                "shape": (len(data),),
                "typestr": "|u1",
                "version": 3,
                "data": (ctypes.addressof(self._cbuf), False),
                "strides": None,
            }
        else:
            self.__cuda_array_interface__ = {
                "shape": (len(data),),
                "typestr": "|u1",
                "version": 3,
                "data": (0, False),
                "strides": None,
                "stream": 1,
            }

    @property
    def buffer_kind(self) -> str:
        return "STRIDED_HOST" if self._device is None else "STRIDED_DEVICE"

    def cuda(self) -> Array:
        if self._device is not None:
            return self
        device_id = getattr(_CURRENT, "device", 0)  # CUDA's current device, per thread
        _take(device_id, len(self._data))
        try:
            return Array(self._data, device_id)
        finally:
            _give(device_id, len(self._data))  # the fake frees at once; the real one when collected

    def cpu(self) -> Array:
        return self if self._device is None else Array(self._data, None)


def as_array(obj: Any) -> Array:
    iface = getattr(obj, "__array_interface__", None)
    if iface is None:
        raise TypeError("as_array: object exposes neither __array_interface__ nor __cuda_array_interface__")
    if iface.get("typestr") != "|u1" or len(iface["shape"]) != 1:
        raise TypeError("as_array: this stand-in takes 1-D |u1 buffers only")
    return Array(ctypes.string_at(iface["data"][0], iface["shape"][0]), None)


def _take(device: int, size: int) -> None:
    if device not in STATE["free"]:
        raise RuntimeError("CUDA error: invalid device ordinal (%d)" % device)
    if STATE["free"][device] < size:
        raise RuntimeError("CUDA error: out of memory")
    STATE["free"][device] -= size


def _give(device: int, size: int) -> None:
    STATE["free"][device] += size


_CODEC_KWARGS = {
    "algorithm",
    "device_id",
    "cuda_stream",
    "uses_stream_ordered_allocator",
    "bitstream_kind",
    "checksum_policy",
    "chunk_size",
    "data_type",
    "algorithm_type",
}


class Codec:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - _CODEC_KWARGS
        if unknown:
            raise TypeError("Codec(): unexpected keyword arguments %s" % sorted(unknown))
        if kwargs.get("algorithm") != "ANS":
            raise ValueError("this stand-in implements ANS only")
        self.device = int(kwargs.get("device_id", 0))
        if self.device not in STATE["free"]:
            raise RuntimeError("CUDA error: invalid device ordinal (%d)" % self.device)
        self._thread = threading.get_ident()

    def _check(self, array: Array) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError("a Codec must be used by the thread that created it (stand-in rule)")
        if not isinstance(array, Array) or array._device != self.device:
            raise RuntimeError("expected an Array on device %d" % self.device)

    def encode(self, array: Array) -> Array:
        self._check(array)
        STATE["encodes"] += 1
        if STATE["fail_encode"]:
            STATE["fail_encode"] -= 1
            raise RuntimeError("CUDA error: out of memory (cudaMallocAsync)")
        body = zlib.compress(array._data, 6)
        return Array(_HEADER.pack(b"FAKEANS\0", STATE["format_major"], len(array._data)) + body, self.device)

    def decode(self, array: Array, data_type: str = "") -> Array:
        self._check(array)
        STATE["decodes"] += 1
        if STATE["fail_decode"]:
            STATE["fail_decode"] -= 1
            raise RuntimeError("CUDA error: out of memory (cudaMallocAsync)")
        data = array._data
        if len(data) < _HEADER.size:
            raise RuntimeError("nvCOMP error: nvcompErrorBadChecksum / invalid format")
        magic, major, size = _HEADER.unpack(data[: _HEADER.size])
        if magic != b"FAKEANS\0" or major != int(__version__.split(".")[0]):
            raise RuntimeError("nvCOMP error: invalid or unsupported bitstream format")
        try:
            out = zlib.decompress(data[_HEADER.size :])
        except zlib.error as exc:
            raise RuntimeError("nvCOMP error: decompression failed: %s" % exc) from None
        if len(out) != size:
            raise RuntimeError("nvCOMP error: decompressed size mismatch")
        return Array(out, self.device)


class FakeProbe:
    """The gs_gpu.GpuProbe adapter's answers for a box with the stand-in's devices."""

    def __init__(self, driver: int | None = 12040, devices: list[dict[str, Any]] | None = None) -> None:
        self.driver = driver
        self._devices = devices

    def driver_version(self) -> int | None:
        return self.driver

    def make_current(self, index: int) -> bool:
        if index not in STATE["free"]:
            return False
        _CURRENT.device = index
        return True

    def devices(self) -> list[dict[str, Any]] | None:
        if self._devices is not None:
            return self._devices
        return [
            {"index": i, "free": free, "total": 80 << 30, "compute_mode": "default", "processes": 0}
            for i, free in STATE["free"].items()
        ]
