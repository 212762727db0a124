"""gs_codecs and gs_manifest: per-part encoding rules and manifest validation (pure)."""

from __future__ import annotations

import copy
import hashlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

from gs_codecs import Codec, ZstdCodec, encode_part, for_restore, for_snapshot  # noqa: E402
from gs_common import ScriptError  # noqa: E402
from gs_manifest import build, part_key, validate  # noqa: E402


def test_zstd_round_trip_and_threads_share_nothing() -> None:
    codec = ZstdCodec(level=3)
    raw = b"weights " * 50000
    name, stored = encode_part(codec, raw)
    assert name == "zstd" and len(stored) < len(raw) // 10
    assert codec.decompress(stored, len(raw)) == raw


def test_incompressible_part_is_stored_raw() -> None:
    raw = os.urandom(256 * 1024)
    name, stored = encode_part(ZstdCodec(level=3), raw)
    assert name == "none" and stored is raw


def test_corrupt_zstd_frame_is_part_corrupt() -> None:
    codec = ZstdCodec(level=3)
    with pytest.raises(ScriptError) as err:
        codec.decompress(b"\x28\xb5\x2f\xfd" + os.urandom(64), 1000)
    assert err.value.code == "part_corrupt"


def test_codec_selection() -> None:
    assert isinstance(for_snapshot("none", 3), Codec) and for_snapshot("none", 3).name == "none"
    if not os.path.exists("/dev/nvidiactl"):
        assert for_snapshot("auto", 3).name == "zstd"  # no GPU here: auto falls back to zstd
        # asked for the GPU codec on a host without one: a missing compressor is said, never an error
        fell_back = for_snapshot("nvcomp-ans", 3, bootstrap=False)
        assert fell_back.name == "zstd" and fell_back.fallback is not None
        assert fell_back.fallback["requested"] == "nvcomp-ans" and fell_back.fallback["reasons"]
        assert for_snapshot("auto", 3).fallback is None  # auto without a GPU is its rule, not a fallback
    with pytest.raises(ScriptError) as err:
        for_snapshot("lzma", 3)
    assert err.value.code == "bad_config"
    with pytest.raises(ScriptError) as err:
        for_restore(["zstd", "brotli"])
    assert err.value.code == "manifest_invalid"


def _manifest() -> dict:
    parts = []
    for i, data in enumerate([b"a" * 10, b"b" * 4]):
        digest = hashlib.sha256(data).hexdigest()
        parts.append(
            {
                "index": i,
                "key": part_key(i),
                "codec": "none",
                "raw_size": len(data),
                "stored_size": len(data),
                "sha256": digest,
                "raw_sha256": digest,
            }
        )
    return build(
        cfg={"snapshot_id": "s", "instance_id": "i"},
        codec="none",
        part_size=10,
        parts=parts,
        files=3,
        source={},
        created_at="2025-01-01T00:00:00Z",
        timings={"total_s": 1.0},
    )


def test_built_manifest_validates() -> None:
    doc = _manifest()
    assert validate(doc) is doc
    assert doc["totals"] == {"raw_bytes": 14, "stored_bytes": 14, "parts": 2, "files": 3}


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(version=2),
        lambda d: d["parts"][1].update(key="../../etc/passwd"),
        lambda d: d["parts"][1].update(index=5),
        lambda d: d["parts"][0].update(codec="lz4"),
        lambda d: d["parts"][0].update(sha256="zz"),
        lambda d: d["parts"][0].update(raw_size=-1),
        lambda d: d["totals"].update(raw_bytes=1),
        lambda d: d.update(parts=[]),
        lambda d: d.pop("totals"),
    ],
)
def test_broken_manifests_are_invalid(breakage) -> None:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(_manifest())
    breakage(doc)
    with pytest.raises(ScriptError) as err:
        validate(doc)
    assert err.value.code == "manifest_invalid"


def test_zstd_frames_carry_a_checksum_that_catches_bad_output() -> None:
    codec = ZstdCodec(level=3)
    raw = b"0123456789abcdef" * 8192
    stored = bytearray(codec.compress(raw))
    assert codec.checks_output(bytes(stored))  # so restore may skip re-hashing the decoded bytes
    stored[-1] ^= 0x01  # the XXH64 trailer
    with pytest.raises(ScriptError) as err:
        codec.decompress(bytes(stored), len(raw))
    assert err.value.code == "part_corrupt"
    legacy = __import__("zstandard").ZstdCompressor(level=3).compress(raw)  # no checksum flag
    assert not codec.checks_output(legacy)


def test_raw_digest_may_be_left_out_only_for_self_checking_zstd_parts() -> None:
    doc = _manifest()
    doc["parts"][0].update(codec="zstd", raw_sha256=None)
    assert validate(doc) is doc  # the zstd frame's checksum vouches for the decoded bytes
    for codec in ("none", "nvcomp-ans"):
        doc["parts"][0].update(codec=codec, raw_sha256=None)
        with pytest.raises(ScriptError) as err:
            validate(doc)
        assert err.value.code == "manifest_invalid"


def test_zstd_parts_written_here_carry_a_content_checksum() -> None:
    codec = ZstdCodec(level=3)
    stored = codec.compress(b"weights " * 10_000)
    assert codec.checks_output(stored)
