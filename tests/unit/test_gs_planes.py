"""gs_planes: the zstd-planes codec and auto's per-part choice (pure, with the zstandard package)."""

from __future__ import annotations

import array
import hashlib
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_codecs import ZstdCodec, encode_part, for_restore, for_snapshot  # noqa: E402
from gs_common import ScriptError  # noqa: E402
from gs_manifest import build, validate  # noqa: E402
from gs_planes import MAGIC, AutoCpuCodec, PlanesCodec  # noqa: E402


def bf16(n: int, seed: int = 1) -> bytes:
    """n bf16 values ~ N(0, 0.02) (a weight matrix's spread): the top half of each float32."""
    rng = random.Random(seed)
    f32 = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(n))).tobytes()
    out = bytearray(2 * n)
    out[0::2], out[1::2] = f32[2::4], f32[3::4]  # little-endian: bytes 2 and 3 are the high half
    return bytes(out)


@pytest.fixture(scope="module")
def planes() -> PlanesCodec:
    return PlanesCodec(ZstdCodec(level=3).zstd)


@pytest.mark.parametrize("size", [1, 2, 3, 4097, 100001])
def test_round_trip_of_any_length_into_the_fetchers_spare_byte_buffer(planes: PlanesCodec, size: int) -> None:
    raw = (bf16(size // 2 + 1) + b"\x7f")[:size]
    stored = planes.compress(memoryview(bytearray(raw)))
    assert stored[:4] == MAGIC and planes.checks_output(stored)
    rbuf = bytearray(size + 100)  # recycled buffer; the fetcher passes raw_size + 1 of it
    n = planes.decompress_into(stored, memoryview(rbuf)[: size + 1])
    assert n == size and bytes(rbuf[:n]) == raw
    assert planes.decompress(stored, size) == raw
    assert planes.decompress_into(stored, memoryview(bytearray(size))) == size  # too short: "more"


def test_planes_beat_plain_zstd_on_bf16_weights_and_auto_picks_them() -> None:
    raw = bf16(1 << 19)  # 1 MiB
    auto = for_snapshot("auto", 3, bootstrap=False)
    assert isinstance(auto, AutoCpuCodec)
    name, stored = encode_part(auto, raw)
    plain = ZstdCodec(level=3).compress(raw)
    assert name == "zstd-planes" and len(stored) < len(plain) * 0.95
    assert len(raw) / len(stored) > 1.25
    assert auto.checks_output(stored)  # so the pipeline leaves raw_sha256 out, as for zstd
    decoder = for_restore([name], bootstrap=False)[name]
    assert decoder.decompress(stored, len(raw)) == raw


def test_auto_keeps_plain_zstd_for_text_and_raw_for_noise() -> None:
    auto = for_snapshot("auto", 3, bootstrap=False)
    text = b"".join(b"line %d of a log file, nothing like weights\n" % i for i in range(40000))
    name, stored = encode_part(auto, text)
    assert name == "zstd" and stored[:4] == b"\x28\xb5\x2f\xfd" and auto.checks_output(stored)
    assert encode_part(auto, os.urandom(1 << 20))[0] == "none"


def test_a_corrupt_planes_part_is_part_corrupt_never_wrong_bytes(planes: PlanesCodec) -> None:
    raw = bf16(50000)
    stored = bytearray(planes.compress(raw))
    for damage in (
        lambda b: b.__setitem__(slice(0, 4), b"GSP9"),  # header
        lambda b: b.__setitem__(len(b) - 3, b[len(b) - 3] ^ 0xFF),  # plane 1's checksum
        lambda b: b.__delitem__(slice(len(b) - 10, None)),
    ):  # truncated
        bad = bytearray(stored)
        damage(bad)
        with pytest.raises(ScriptError) as err:
            planes.decompress_into(bytes(bad), memoryview(bytearray(len(raw) + 1)))
        assert err.value.code == "part_corrupt"
    with pytest.raises(ScriptError) as err:  # plain zstd refuses the planes form instead of misreading it
        ZstdCodec(level=3).decompress(bytes(stored), len(raw))
    assert err.value.code == "part_corrupt"


def test_explicit_zstd_planes_and_the_manifest_accept_it_without_raw_digest() -> None:
    codec = for_snapshot("zstd-planes", 3, bootstrap=False)
    raw = bf16(20000)
    name, stored = encode_part(codec, raw)
    assert name == "zstd-planes"
    part = {
        "index": 0,
        "key": "part-00000",
        "codec": name,
        "raw_size": len(raw),
        "stored_size": len(stored),
        "sha256": hashlib.sha256(stored).hexdigest(),
        "raw_sha256": None,
    }
    doc = build(
        cfg={"snapshot_id": "s"},
        codec=codec.name,
        part_size=1 << 20,
        parts=[part],
        files=1,
        source={},
        created_at="t",
        timings={},
    )
    assert validate(doc)["decode"] == {"requires_gpu": False}


def test_auto_stores_an_incompressible_part_raw_without_compressing_all_of_it() -> None:
    class Counting(ZstdCodec):
        seen = 0

        def compress(self, raw):  # type: ignore[no-untyped-def]
            Counting.seen += len(raw)
            return super().compress(raw)

    zstd = Counting(level=3)
    auto = AutoCpuCodec(zstd, PlanesCodec(zstd.zstd))
    noise = os.urandom(8 << 20)
    assert encode_part(auto, noise) == ("none", noise)
    assert Counting.seen <= 1 << 20  # the 4 x 256 KiB sample, not the 8 MiB part
    weights = bf16(1 << 20)
    assert encode_part(auto, weights)[0] == "zstd-planes"
