"""gs_nvcomp / gs_gpu on the CPU, against a stand-in `nvidia.nvcomp` (tests/fakes/fake_nvcomp.py,
written from NVIDIA's Python API docs) installed the way a host gets it: a bootstrapped `nvidia/nvcomp`
directory, behind a regular `nvidia` package that an older NVIDIA wheel left on the path."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_codecs import decode_requirements, encode_part, fallback_warning, for_restore, for_snapshot  # noqa: E402
from gs_common import ScriptError  # noqa: E402
from gs_nvcomp import NvcompAnsCodec  # noqa: E402

from tests.fakes import fake_nvcomp  # noqa: E402
from tests.fakes.fake_nvcomp import FakeProbe  # noqa: E402

RAW = (b"layer.weight " * 3000 + bytes(range(256)) * 40)[:50001]  # odd length, compressible
_STANDIN = "import sys\nfrom tests.fakes import fake_nvcomp\nsys.modules[__name__] = fake_nvcomp\n"


def _site(root: Path, nvcomp_init: str) -> None:
    """root/hider/nvidia/__init__.py (a regular package, as older NVIDIA wheels ship) in front of
    root/boot/nvidia/nvcomp (where gs_bootstrap installs nvCOMP)."""
    (root / "hider" / "nvidia").mkdir(parents=True)
    (root / "hider" / "nvidia" / "__init__.py").write_text("# nvidia-cublas-cu11 style\n")
    (root / "boot" / "nvidia" / "nvcomp").mkdir(parents=True)
    (root / "boot" / "nvidia" / "nvcomp" / "__init__.py").write_text(nvcomp_init)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    fake_nvcomp.reset()
    monkeypatch.setattr(sys, "path", list(sys.path))  # ensure() adds its private dir: undone after
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("nvidia", "nvidia.nvcomp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _site(tmp_path, _STANDIN)
    sys.path[:0] = [str(tmp_path / "hider"), str(tmp_path / "boot")]
    importlib.invalidate_caches()
    yield tmp_path
    for name in ("nvidia", "nvidia.nvcomp"):
        sys.modules.pop(name, None)


def test_a_regular_nvidia_package_does_not_hide_the_bootstrapped_nvcomp(host: Path) -> None:
    with pytest.raises(ImportError):  # the bug: pip succeeded, the import does not
        importlib.import_module("nvidia.nvcomp")
    codec = NvcompAnsCodec(bootstrap=False, probe=FakeProbe())
    assert codec.version() == "6.0.0" and codec.device_id == 0


def test_restore_decodes_into_the_spare_byte_buffer_the_fetcher_gives(host: Path) -> None:
    codec = for_snapshot("nvcomp-ans", 3, bootstrap=False, gpu_probe=FakeProbe())
    name, stored = encode_part(codec, RAW)
    assert name == "nvcomp-ans" and codec.fallback is None
    decoder = for_restore([name], bootstrap=False, gpu_probe=FakeProbe())[name]
    rbuf = bytearray(len(RAW) + 64)  # a recycled part buffer, as gs_fetch hands it: raw_size + 1
    n = decoder.decompress_into(stored, memoryview(rbuf)[: len(RAW) + 1])
    assert n == len(RAW) and bytes(rbuf[:n]) == RAW
    short = bytearray(len(RAW) - 1)  # an over-long part shows as a count past the buffer
    assert decoder.decompress_into(stored, memoryview(short)) == len(RAW)
    assert not decoder.checks_output(stored)  # so the fetcher checks raw_sha256


def test_a_cuda_error_on_a_part_stores_that_part_on_the_cpu(host: Path) -> None:
    codec = for_snapshot("auto", 3, bootstrap=False, gpu_probe=FakeProbe())
    assert codec.name == "nvcomp-ans"
    fake_nvcomp.STATE["fail_encode"] = 1  # the user's training job took the memory since selection
    first, stored1 = encode_part(codec, RAW)
    second, stored2 = encode_part(codec, RAW)
    assert first in ("zstd", "zstd-planes") and second == "nvcomp-ans"
    assert codec.fallback and codec.fallback["parts_on_cpu"] == 1
    assert "out of memory" in (fallback_warning(codec) or "")
    decoders = for_restore([first, second], bootstrap=False, gpu_probe=FakeProbe())
    assert decoders[first].decompress(stored1, len(RAW)) == RAW
    assert decoders[second].decompress(stored2, len(RAW)) == RAW


def test_a_cuda_error_on_decode_is_gpu_error_and_a_bad_stream_part_corrupt(host: Path) -> None:
    codec = NvcompAnsCodec(bootstrap=False, probe=FakeProbe())
    stored = codec.compress(RAW)
    fake_nvcomp.STATE["fail_decode"] = 1
    with pytest.raises(ScriptError) as err:
        codec.decompress_into(stored, memoryview(bytearray(len(RAW) + 1)))
    assert err.value.code == "gpu_error"
    with pytest.raises(ScriptError) as err:
        codec.decompress(stored[:40] + b"\x00" * 40, len(RAW))
    assert err.value.code == "part_corrupt"


def test_a_failed_round_trip_at_selection_means_zstd(host: Path) -> None:
    fake_nvcomp.STATE["fail_encode"] = 1
    codec = for_snapshot("auto", 3, bootstrap=False, gpu_probe=FakeProbe())
    assert codec.name == "zstd" and codec.fallback is None  # auto without a usable GPU: its rule
    fake_nvcomp.STATE["fail_encode"] = 1
    asked = for_snapshot("nvcomp-ans", 3, bootstrap=False, gpu_probe=FakeProbe())
    assert asked.name == "zstd" and "round trip on GPU 0 failed" in (fallback_warning(asked) or "")


def test_the_gpu_with_most_free_memory_that_admits_us_is_chosen(host: Path) -> None:
    fake_nvcomp.reset(devices=4)
    gib = 1 << 30
    probe = FakeProbe(
        devices=[
            {"index": 0, "free": 1 * gib, "total": 80 * gib, "compute_mode": "default", "processes": 1},
            {"index": 1, "free": 70 * gib, "total": 80 * gib, "compute_mode": "exclusive_process", "processes": 1},
            {"index": 2, "free": 60 * gib, "total": 80 * gib, "compute_mode": "prohibited", "processes": 0},
            {"index": 3, "free": 20 * gib, "total": 80 * gib, "compute_mode": "default", "processes": 2},
        ]
    )
    assert NvcompAnsCodec(bootstrap=False, probe=probe).device_id == 3
    probe._devices = probe._devices[:3]  # type: ignore[index]
    codec = for_snapshot("nvcomp-ans", 3, bootstrap=False, gpu_probe=probe, part_size=64 << 20, parallelism=8)
    warning = fallback_warning(codec) or ""
    assert codec.name == "zstd"
    assert "GPU 0: 1024 MiB free, 2560 MiB needed" in warning and "Prohibited" in warning
    assert "exclusive_process and 1 process(es) hold it" in warning


def test_a_library_that_does_not_load_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("nvidia", "nvidia.nvcomp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _site(tmp_path, "raise OSError('libnvcomp.so.6: cannot open shared object file')\n")
    sys.path[:0] = [str(tmp_path / "hider"), str(tmp_path / "boot")]
    try:
        codec = for_snapshot("nvcomp-ans", 3, bootstrap=False, gpu_probe=FakeProbe())
        assert codec.name == "zstd" and "libnvcomp.so.6" in (fallback_warning(codec) or "")
        with pytest.raises(ScriptError) as err:
            for_restore(["nvcomp-ans", "zstd"], bootstrap=False, gpu_probe=FakeProbe())
        assert err.value.code == "gpu_required" and "libnvcomp.so.6" in err.value.message
    finally:
        for name in ("nvidia", "nvidia.nvcomp"):
            sys.modules.pop(name, None)


def test_nvcomp_5_is_not_used(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_nvcomp, "__version__", "5.1.0")
    with pytest.raises(ScriptError) as err:
        NvcompAnsCodec(bootstrap=False, probe=FakeProbe())
    assert err.value.code == "codec_unavailable" and "5.1.0" in err.value.message


def test_restore_without_a_gpu_is_refused_before_any_download() -> None:
    with pytest.raises(ScriptError) as err:
        for_restore(["zstd", "nvcomp-ans"], bootstrap=False, gpu_probe=FakeProbe(driver=None))
    assert err.value.code == "gpu_required" and "CUDA GPU" in err.value.message
    assert decode_requirements(["zstd", "nvcomp-ans"]) == {"requires_gpu": True, "nvcomp_major": 6}
    assert decode_requirements(["zstd-planes", "none"]) == {"requires_gpu": False}


def test_each_thread_gets_its_own_nvcomp_codec(host: Path) -> None:
    codec = NvcompAnsCodec(bootstrap=False, probe=FakeProbe())
    results: list[Any] = []

    def work() -> None:
        results.append(encode_part(codec, RAW)[0])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["nvcomp-ans"] * 4 and codec.fallback is None


def test_the_pinned_nvcomp_is_major_6_like_the_codec_and_the_test_extra() -> None:
    from gs_bootstrap import PINNED
    from gs_nvcomp import NVCOMP_MAJOR

    root = Path(__file__).resolve().parents[2]
    assert NVCOMP_MAJOR == 6 and '"nvidia-nvcomp-cu12>=6,<7"' in (root / "pyproject.toml").read_text()
    for cuda in (12, 13):
        versions = {line.split("==")[1].split()[0] for line in PINNED["nvidia-nvcomp-cu%d" % cuda]}
        assert versions and all(v.startswith("6.") for v in versions)


class _Bucket:
    """The one call PartFetcher makes of gs_s3.S5 (cat_into: at most expected + 1 bytes into buf)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def cat_into(self, key: str, buf: bytearray, expected: int, fallback: str = "download_failed") -> int:
        data = self.objects[key][: expected + 1]
        buf[: len(data)] = data
        return len(data)


def test_the_fetcher_restores_nvcomp_parts_and_their_cpu_fallbacks(host: Path) -> None:
    """The restore path itself (gs_fetch.PartFetcher: spare-byte buffers, raw_sha256 for nvCOMP parts)
    over parts a GPU snapshot wrote, one of which fell back to the CPU."""
    import hashlib

    from gs_fetch import PartFetcher

    codec = for_snapshot("auto", 3, bootstrap=False, gpu_probe=FakeProbe())
    raws = [RAW, RAW[::-1], RAW[:777] * 3, RAW[1:]]
    fake_nvcomp.STATE["fail_encode"] = 1  # the first part lands on the CPU
    parts, objects = [], {}
    for i, raw in enumerate(raws):
        name, stored = encode_part(codec, raw)
        key = "part-%05d" % i
        objects["p/" + key] = bytes(stored)
        parts.append(
            {
                "index": i,
                "key": key,
                "codec": name,
                "raw_size": len(raw),
                "stored_size": len(stored),
                "sha256": hashlib.sha256(stored).hexdigest(),
                "raw_sha256": None
                if codec.checks_output(stored) and name != "nvcomp-ans"
                else hashlib.sha256(raw).hexdigest(),
            }
        )
    assert parts[0]["codec"] != "nvcomp-ans" and {p["codec"] for p in parts[1:]} == {"nvcomp-ans"}
    codecs = for_restore([p["codec"] for p in parts], bootstrap=False, gpu_probe=FakeProbe())
    fetcher = PartFetcher(
        ctx=None,
        s5=_Bucket(objects),
        prefix="p/",
        parts=parts,
        codecs=codecs,  # type: ignore[arg-type]
        window=3,
    )
    try:
        got = []
        while True:
            item = fetcher.next()
            if item is None:
                break
            buf, view = item
            got.append(bytes(view))
            fetcher.release(buf)
    finally:
        fetcher.close()
    assert got == raws


def test_the_snapshot_asks_the_gpu_for_its_real_part_size_and_compress_workers(host: Path) -> None:
    """snapshot.py once chose the codec without its part size and parallelism, so the free-memory
    check assumed 32 MiB x 4 whatever the run was about to hold on the device."""
    import snapshot
    from gs_tuning import plan

    mib = 1 << 20
    fake_nvcomp.reset(free=1536 * mib)
    opts = snapshot.parse_config(
        {
            "workspace_path": str(host),
            "s3": {},
            "prefix": "snaps/s1/",
            "codec": "nvcomp-ans",
            "part_size": 64 * mib,
            "bootstrap": False,
        }
    )
    tuning = plan(cap=4, part_size=64 * mib, copies=3, cpus=8, mem_available=64 << 30)
    assert tuning["compress_workers"] == 4
    # 1 GiB + 3 x 64 MiB x 4 = 1792 MiB needed; 32 MiB x 4 (the old assumption) would have fitted.
    codec = snapshot.choose_codec(opts, {}, tuning, gpu_probe=FakeProbe())
    assert codec.name == "zstd"
    assert "GPU 0: 1536 MiB free, 1792 MiB needed" in (fallback_warning(codec) or "")
    # Format 2 compresses 16 MiB blocks, not parts: 1 GiB + 3 x 16 MiB x 4 fits.
    fitting = snapshot.choose_codec(opts, {"block_size": 16 * mib}, tuning, gpu_probe=FakeProbe())
    assert fitting.name == "nvcomp-ans"
    # Two compress workers: 1 GiB + 3 x 64 MiB x 2 = 1408 MiB fits too.
    fewer = plan(cap=4, part_size=64 * mib, copies=3, cpus=2, mem_available=64 << 30)
    assert snapshot.choose_codec(opts, {}, fewer, gpu_probe=FakeProbe()).name == "nvcomp-ans"
