"""nvCOMP ANS codec on a real CUDA GPU. Skipped (with the reason) where there is none."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_codecs import NvcompAnsCodec, cuda_driver_version, encode_part, for_snapshot  # noqa: E402
from gs_common import ScriptError  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ans() -> NvcompAnsCodec:
    if cuda_driver_version() is None:
        pytest.skip("no CUDA GPU visible (libcuda.so.1 missing or no device)")
    try:
        return NvcompAnsCodec(bootstrap=False)
    except ScriptError as exc:
        pytest.skip("nvCOMP not importable: %s" % exc.message)


def test_ans_round_trip(ans: NvcompAnsCodec) -> None:
    raw = bytes(range(256)) * 4096 + b"\x00" * 100000
    name, stored = encode_part(ans, raw)
    assert name == "nvcomp-ans" and len(stored) < len(raw)
    assert ans.decompress(stored, len(raw)) == raw


def test_ans_on_random_data_falls_back_to_raw(ans: NvcompAnsCodec) -> None:
    raw = os.urandom(1 << 20)
    name, stored = encode_part(ans, raw)
    assert name == "none" and stored == raw


def test_auto_prefers_nvcomp_when_available(ans: NvcompAnsCodec) -> None:
    assert for_snapshot("auto", 3, bootstrap=False).name == "nvcomp-ans"


def test_corrupt_ans_stream_is_part_corrupt(ans: NvcompAnsCodec) -> None:
    raw = b"abc" * 100000
    stored = bytearray(ans.compress(raw))
    stored[len(stored) // 2] ^= 0xFF
    try:
        out = ans.decompress(bytes(stored), len(raw))
    except ScriptError as exc:
        assert exc.code == "part_corrupt"
    else:  # ANS may decode garbage without noticing; restore's raw_sha256 check catches that
        assert out != raw


def test_ans_restore_path_decodes_into_the_spare_byte_buffer(ans: NvcompAnsCodec) -> None:
    raw = bytes(range(256)) * 3000 + b"\x01"  # odd length
    stored = ans.compress(raw)
    buf = bytearray(len(raw) + 1)  # what gs_fetch hands decompress_into
    assert ans.decompress_into(stored, memoryview(buf)) == len(raw) and bytes(buf[: len(raw)]) == raw


def test_ans_selection_round_trips_on_the_gpu_nvml_chose(ans: NvcompAnsCodec) -> None:
    from gs_gpu import GpuProbe

    devices = GpuProbe().devices()
    if devices:  # NVML answered: the codec is on the usable device with the most free memory
        assert ans.device_id in {d["index"] for d in devices}
