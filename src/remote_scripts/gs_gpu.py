"""Which CUDA GPU, if any, the nvCOMP codec may use: the driver through libcuda, the devices through
NVML (libnvidia-ml), both with ctypes so the scripts stay stdlib-only.

`GpuProbe` is the adapter gs_nvcomp asks; tests hand it a stand-in with the same methods.
A device is usable when its compute mode lets another process in (not Prohibited; not Exclusive
Process while a process holds it) and its free memory covers what the codec will hold at once:
about 1 GiB for the CUDA context and nvCOMP's scratch, plus, per part in flight, the input on the
device, the output and nvCOMP's temporary buffer (3 x part size). Among usable devices the one with
the most free memory wins: a training job on device 0 is the common case on a rented box.
"""

from __future__ import annotations

import ctypes
from typing import Any, Dict, List, Optional, Tuple

GIB = 1 << 30
CONTEXT_BYTES = GIB  # CUDA context + nvCOMP scratch, per process
# NVML's nvmlComputeMode_t (nvml.h): 0 Default, 1 Exclusive_Thread (deprecated), 2 Prohibited,
# 3 Exclusive_Process.
COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}
_NVML_SUCCESS, _NVML_ERROR_INSUFFICIENT_SIZE = 0, 7


def needed_bytes(part_size: int, parallelism: int) -> int:
    return CONTEXT_BYTES + 3 * part_size * max(1, parallelism)


class _Memory(ctypes.Structure):  # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _PciInfo(ctypes.Structure):  # nvmlPciInfo_t (v3)
    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


class GpuProbe:
    """The real adapter: libcuda for the driver and the CUDA ordinal, NVML for the rest."""

    def driver_version(self) -> Optional[int]:
        """CUDA driver version (e.g. 12040) when libcuda loads and sees at least one device, else None."""
        cuda = self._cuda()
        if cuda is None:
            return None
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value

    def devices(self) -> Optional[List[Dict[str, Any]]]:
        """One dict per GPU this process can use (CUDA ordinal `index`, `free`, `total` bytes,
        `compute_mode`, `processes`), or None when NVML cannot be asked."""
        cuda = self._cuda()
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        try:
            if cuda is None or nvml.nvmlInit_v2() != _NVML_SUCCESS:
                return None
        except AttributeError:
            return None
        try:
            count = ctypes.c_uint(0)
            if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != _NVML_SUCCESS:
                return None
            found = []
            for i in range(count.value):
                info = self._device(nvml, cuda, i)
                if info is not None:
                    found.append(info)
            return found
        except AttributeError:  # an NVML too old for the _v2/_v3 entry points
            return None
        finally:
            nvml.nvmlShutdown()

    def make_current(self, index: int) -> bool:
        """Make `index`'s primary context current for the calling thread (CUDA's current device is per
        thread; nvCOMP's host-to-device copies go to it). False when the driver refuses."""
        cuda = self._cuda()
        if cuda is None:
            return False
        device, ctx = ctypes.c_int(0), ctypes.c_void_p()
        try:
            return (
                cuda.cuDeviceGet(ctypes.byref(device), index) == 0
                and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) == 0
                and cuda.cuCtxSetCurrent(ctx) == 0
            )
        except AttributeError:
            return False

    def _cuda(self) -> Any:
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
            count = ctypes.c_int(0)
            if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
                return None
            return cuda
        except (OSError, AttributeError):
            return None

    def _device(self, nvml: Any, cuda: Any, i: int) -> Optional[Dict[str, Any]]:
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != _NVML_SUCCESS:
            return None
        pci = _PciInfo()
        ordinal = ctypes.c_int(-1)
        # NVML counts every GPU in PCI order; CUDA counts those CUDA_VISIBLE_DEVICES leaves, fastest
        # first. The PCI bus id maps one to the other (an invisible GPU has no CUDA ordinal: skipped).
        if (
            nvml.nvmlDeviceGetPciInfo_v3(handle, ctypes.byref(pci)) != _NVML_SUCCESS
            or cuda.cuDeviceGetByPCIBusId(ctypes.byref(ordinal), pci.busId) != 0
        ):
            return None
        mem, mode, procs = _Memory(), ctypes.c_int(0), ctypes.c_uint(0)
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != _NVML_SUCCESS:
            return None
        if nvml.nvmlDeviceGetComputeMode(handle, ctypes.byref(mode)) != _NVML_SUCCESS:
            return None
        # With a NULL array NVML answers INSUFFICIENT_SIZE and the count when processes run, else 0.
        rc = nvml.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(procs), None)
        if rc not in (_NVML_SUCCESS, _NVML_ERROR_INSUFFICIENT_SIZE):
            return None
        return {
            "index": ordinal.value,
            "free": mem.free,
            "total": mem.total,
            "compute_mode": COMPUTE_MODES.get(mode.value, str(mode.value)),
            "processes": procs.value,
        }


def choose(devices: List[Dict[str, Any]], need: int) -> Tuple[Optional[int], List[str]]:
    """(CUDA ordinal of the usable device with the most free memory, or None; why each was passed over)."""
    why: List[str] = []
    usable = []
    for d in devices:
        label = "GPU %d" % d["index"]
        if d["compute_mode"] == "prohibited":
            why.append("%s: compute mode is Prohibited" % label)
        elif d["compute_mode"] in ("exclusive_process", "exclusive_thread") and d["processes"] > 0:
            why.append("%s: compute mode is %s and %d process(es) hold it" % (label, d["compute_mode"], d["processes"]))
        elif d["free"] < need:
            why.append(
                "%s: %d MiB free, %d MiB needed (1 GiB + 3 x part size x parallelism)"
                % (label, d["free"] >> 20, need >> 20)
            )
        else:
            usable.append(d)
    if not devices:
        why.append("NVML lists no GPU this process can see")
    if not usable:
        return None, why
    return max(usable, key=lambda d: d["free"])["index"], why
