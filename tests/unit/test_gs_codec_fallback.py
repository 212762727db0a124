"""A host without the zstandard package: the pinned install, the `zstd` binary codec (same frames as
the package, both ways) and the `none` fallback, all without network."""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "remote_scripts"))

import zstandard  # noqa: E402
from gs_bootstrap import PINNED, ensure, pip_command  # noqa: E402
from gs_codecs import ZstdCodec, encode_part, fallback_warning, for_restore, for_snapshot  # noqa: E402
from gs_common import ScriptError  # noqa: E402
from gs_zstd_cli import ZstdCliCodec, frame_has_checksum  # noqa: E402

ZSTD = shutil.which("zstd")
needs_zstd = pytest.mark.skipif(ZSTD is None, reason="the zstd binary is not installed")
RAW = b"".join(b"layer %d weights 0.%06d\n" % (i % 7, i) for i in range(60000))


@pytest.fixture
def no_zstandard(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The package cannot be imported (None in sys.modules makes `import` raise ImportError), the
    private pip dir is empty and pip always fails: what a host without an index looks like."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # ensure() adds the private dir; undo after
    return tmp_path


@pytest.fixture
def no_zstd_binary(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_every_pin_is_an_exact_version_with_sha256_hashes() -> None:
    for requirement, lines in PINNED.items():
        assert lines, requirement
        for line in lines:
            assert re.match(r"^[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*( ;[^-]+)? --hash=sha256:[0-9a-f]{64}", line), line
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in re.findall(r"--hash=sha256:(\S+)", line))
    assert any("nvidia-libnvcomp-cu12==6." in line for line in PINNED["nvidia-nvcomp-cu12"])


def test_pip_is_asked_for_hash_checked_wheels_only() -> None:
    cmd = pip_command("/tmp/req.txt", "/tmp/lib", ["pip"])
    for flag in ("--require-hashes", "--only-binary=:all:", "--no-deps"):
        assert flag in cmd
    assert cmd[-2:] == ["-r", "/tmp/req.txt"] and cmd[cmd.index("--target") + 1] == "/tmp/lib"


def test_install_hands_pip_exactly_the_pinned_lines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seen = tmp_path / "seen.txt"
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import sys, shutil\nshutil.copy(sys.argv[sys.argv.index('-r') + 1], %r)\nsys.exit(1)\n" % str(seen)
    )
    with pytest.raises(ScriptError) as err:
        ensure("gs_never_importable_zz", "zstandard", pip=[sys.executable, str(fake_pip)], target=str(tmp_path / "lib"))
    sys.path.remove(str(tmp_path / "lib"))
    assert err.value.code == "missing_dependency" and "pinned" in err.value.message
    assert seen.read_text().splitlines() == PINNED["zstandard"]


def test_unpinned_requirement_is_never_installed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pip-ran"
    with pytest.raises(ScriptError) as err:
        ensure("gs_never_importable_zz", "evil-package", pip=["touch", str(marker)], target=str(tmp_path / "lib"))
    sys.path.remove(str(tmp_path / "lib"))
    assert err.value.code == "missing_dependency" and not marker.exists()


@needs_zstd
def test_binary_frames_and_package_frames_are_interchangeable() -> None:
    cli, pkg = ZstdCliCodec(ZSTD, level=3), ZstdCodec(level=3)
    name, by_cli = encode_part(cli, RAW)
    assert name == "zstd" and len(by_cli) < len(RAW) // 5 and frame_has_checksum(by_cli)
    assert cli.checks_output(by_cli) and pkg.checks_output(by_cli)
    assert pkg.decompress(by_cli, len(RAW)) == RAW  # written by the binary, read by the package
    out = bytearray(len(RAW) + 1)
    assert pkg.decompress_into(by_cli, memoryview(out)) == len(RAW) and out[: len(RAW)] == RAW
    by_pkg = pkg.compress(RAW)
    assert cli.decompress(by_pkg, len(RAW)) == RAW  # and the other way round
    out = bytearray(len(RAW) + 1)
    assert cli.decompress_into(by_pkg, memoryview(out)) == len(RAW) and bytes(out[: len(RAW)]) == RAW
    assert cli.version().startswith("zstd-cli 1.")


@needs_zstd
def test_binary_codec_refuses_corrupt_and_over_long_frames() -> None:
    cli = ZstdCliCodec(ZSTD, level=3)
    stored = bytearray(cli.compress(RAW))
    stored[len(stored) // 2] ^= 0xFF
    with pytest.raises(ScriptError) as err:
        cli.decompress(bytes(stored), len(RAW))
    assert err.value.code == "part_corrupt"
    with pytest.raises(ScriptError) as err:
        cli.decompress(b"\x28\xb5\x2f\xfd" + os.urandom(64), 1000)
    assert err.value.code == "part_corrupt"
    short = bytearray(100 + 1)  # the manifest claims 100 bytes; the frame holds far more
    assert cli.decompress_into(cli.compress(RAW), memoryview(short)) == len(short)
    assert not frame_has_checksum(b"") and not frame_has_checksum(b"\x28\xb5\x2f\xfd\x00")


@needs_zstd
def test_snapshot_without_the_package_uses_the_binary_and_says_so(no_zstandard) -> None:  # type: ignore[no-untyped-def]
    codec = for_snapshot("zstd", 3, bootstrap=False)
    assert isinstance(codec, ZstdCliCodec) and codec.fallback is not None
    assert codec.fallback["used"] == "zstd" and "zstandard" in " ".join(codec.fallback["reasons"])
    assert "zstd-cli" in (fallback_warning(codec) or "")
    name, stored = encode_part(codec, RAW)
    assert name == "zstd" and zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(RAW)) == RAW
    restore = for_restore(["zstd", "none"], bootstrap=False)
    assert isinstance(restore["zstd"], ZstdCliCodec) and restore["zstd"].decompress(stored, len(RAW)) == RAW


def test_snapshot_with_no_compressor_at_all_stores_parts_raw(no_zstandard, no_zstd_binary) -> None:  # type: ignore[no-untyped-def]
    for asked in ("auto", "zstd", "nvcomp-ans"):
        codec = for_snapshot(asked, 3, bootstrap=False)
        assert codec.name == "none" and codec.fallback is not None
        assert codec.fallback["requested"] == asked and codec.fallback["used"] == "none"
        warning = fallback_warning(codec) or ""
        assert warning.startswith("codec %s was asked for; parts are stored with none" % asked)
        assert encode_part(codec, RAW) == ("none", RAW)


def test_restore_of_zstd_parts_without_any_decoder_is_missing_dependency(no_zstandard, no_zstd_binary) -> None:  # type: ignore[no-untyped-def]
    assert for_restore(["none"], bootstrap=False)["none"].name == "none"
    with pytest.raises(ScriptError) as err:
        for_restore(["zstd"], bootstrap=False)
    assert err.value.code == "missing_dependency"
    assert "zstandard" in err.value.message and "zstd` binary" in err.value.message
