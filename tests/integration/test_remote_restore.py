"""restore.py for real: local subprocess, real SeaweedFS, real GNU tar and s5cmd.

Round trip of a tree with every tricky kind of entry; each verification failure leaves the existing
workspace untouched and no staging directory; unsafe archives are refused; disk limits on a real
(tmpfs) filesystem.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fixtures_s3 import run_script, script_config, tree_state

pytestmark = pytest.mark.slow

OLD_MTIME_NS = 981173106_123456789  # 2001-02-03, with nanoseconds


def make_tricky_tree(root: str) -> None:
    os.makedirs(root)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    os.makedirs(j("empty", "nested-empty"))
    os.makedirs(j("dir", "sub"))
    with open(j("dir", "exec.sh"), "w") as fh:
        fh.write("#!/bin/sh\necho hi\n")
    os.chmod(j("dir", "exec.sh"), 0o751)
    with open(j("odd-mode"), "w") as fh:
        fh.write("odd")
    os.chmod(j("odd-mode"), 0o604)
    os.makedirs(j("sticky"))
    os.chmod(j("sticky"), 0o1777)
    os.makedirs(j("private"))
    os.chmod(j("private"), 0o700)
    open(j("zero-bytes"), "w").close()
    with open(j("dir", "sub", "big.bin"), "wb") as fh:  # crosses several 64 KiB part boundaries
        fh.write(os.urandom(300 * 1024) + b"text" * 40000)
    with open(j("sparse.img"), "wb") as fh:
        fh.seek(20 << 20)
        fh.write(b"end")
    os.link(j("dir", "exec.sh"), j("hardlink-to-exec"))
    os.symlink("dir/exec.sh", j("rel-link"))
    os.symlink("does-not-exist", j("dangling-link"))
    os.symlink("../odd-mode", j("dir", "up-link"))
    os.mkfifo(j("a-fifo"))
    with open(j("dir", "suid-tool"), "w") as fh:
        fh.write("#!/bin/sh\n")
    os.chmod(j("dir", "suid-tool"), 0o4755)
    os.makedirs(j("setgid-dir"))
    os.chmod(j("setgid-dir"), 0o2775)
    bad = os.path.join(os.fsencode(root), b"latin1-\xe9t\xe9-\xff")
    with open(bad, "wb") as fh:
        fh.write(b"non-utf8 name")
    long_dir = os.path.join(os.fsencode(root), b"d" * 120)
    os.makedirs(long_dir)
    with open(os.path.join(long_dir, b"long-\xfe-" + b"n" * 150), "wb") as fh:
        fh.write(b"long path, non-utf8")
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(OLD_MTIME_NS, OLD_MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def restored_state(src: str, keep_setuid: bool = False) -> dict[bytes, Any]:
    """What a restore of `src` must produce: the same tree less its FIFO (the gate leaves FIFOs out)
    and, unless kept, without setuid/setgid bits."""
    state = {k: v for k, v in tree_state(src).items() if k != b"a-fifo"}
    if not keep_setuid:
        state = {k: (v[0] & ~0o6000,) + v[1:] for k, v in state.items()}
    return state


def staging_dirs(target: str) -> list[str]:
    return glob.glob(glob.escape(target) + ".gpusnap-staging-*") + glob.glob(
        os.path.join(glob.escape(target), ".gpusnap-staging-*")
    )


def kept_old(target: str) -> list[str]:
    """Workspaces a restore replaced and kept (beside the target, or inside it for a mount point)."""
    return glob.glob(glob.escape(target) + ".gpusnap-old-*") + glob.glob(
        os.path.join(glob.escape(target), ".gpusnap-old-*")
    )


@pytest.fixture
def snapshot_of_tree(tmp_path: Any, s3_server: Any, s3_prefix: str) -> Iterator[dict[str, Any]]:
    src = str(tmp_path / "src")
    make_tricky_tree(src)
    run = run_script("snapshot", script_config(s3_server, s3_prefix, src))
    assert run.returncode == 0, run.stderr
    yield {"src": src, "result": run.last}


@pytest.fixture
def existing_workspace(tmp_path: Any) -> str:
    target = str(tmp_path / "workspace")
    os.makedirs(os.path.join(target, "keep"))
    with open(os.path.join(target, "keep", "me.txt"), "w") as fh:
        fh.write("the old workspace")
    return target


def test_round_trip_is_identical(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, tmp_path: Any, existing_workspace: str
) -> None:
    snap = snapshot_of_tree["result"]
    assert snap["event"] == "result" and snap["parts"] >= 6 and snap["codec"] == "zstd"
    run = run_script("restore", script_config(s3_server, s3_prefix, existing_workspace, overwrite=True))
    assert run.returncode == 0, run.stderr
    assert run.last["event"] == "result" and run.last["raw_bytes"] == snap["raw_bytes"]
    assert run.last["files"] == snap["files"] - 1  # the FIFO is left out and said so
    assert run.last["skipped_members"] == 1 and run.last["skipped_names"] == ["./a-fifo"]
    assert run.last["setuid_cleared"] == 2
    assert tree_state(existing_workspace) == restored_state(snapshot_of_tree["src"])
    assert os.stat(os.path.join(existing_workspace, "dir", "suid-tool")).st_mode & 0o7777 == 0o755
    sparse = os.stat(os.path.join(existing_workspace, "sparse.img"))
    assert sparse.st_size == (20 << 20) + 3 and sparse.st_blocks * 512 < 1 << 20  # still sparse
    assert staging_dirs(existing_workspace) == []
    assert kept_old(existing_workspace) == [run.last["previous_workspace"]]
    with open(os.path.join(run.last["previous_workspace"], "keep", "me.txt")) as fh:
        assert fh.read() == "the old workspace"
    assert run.events[0]["event"] == "started" and any(e["event"] == "progress" for e in run.events)


def test_round_trip_into_missing_target_with_codec_none_keeping_setuid(
    tmp_path: Any, s3_server: Any, s3_prefix: str
) -> None:
    src = str(tmp_path / "src")
    make_tricky_tree(src)
    snap = run_script("snapshot", script_config(s3_server, s3_prefix, src, codec="none"))
    assert snap.returncode == 0, snap.stderr
    target = str(tmp_path / "fresh" / "ws")
    os.makedirs(os.path.dirname(target))
    run = run_script("restore", script_config(s3_server, s3_prefix, target, keep_setuid=True))
    assert run.returncode == 0, run.stderr
    assert tree_state(target) == restored_state(src, keep_setuid=True)
    assert run.last["setuid_cleared"] == 0


@pytest.mark.parametrize(
    "damage,code",
    [
        ("corrupt", "part_corrupt"),
        ("truncate", "part_truncated"),
        ("delete", "part_missing"),
        ("manifest", "manifest_missing"),
        ("garbage-manifest", "manifest_invalid"),
    ],
)
def test_damaged_snapshot_fails_and_leaves_workspace(
    damage: str,
    code: str,
    snapshot_of_tree: dict[str, Any],
    s3_server: Any,
    s3_prefix: str,
    s3_client: Any,
    existing_workspace: str,
) -> None:
    bucket, key = s3_server.bucket, s3_prefix + "part-00002"
    if damage in ("corrupt", "truncate"):
        body = bytearray(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        if damage == "corrupt":
            body[len(body) // 2] ^= 0xFF
        else:
            del body[len(body) // 2 :]
        s3_client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    elif damage == "delete":
        s3_client.delete_object(Bucket=bucket, Key=key)
    elif damage == "manifest":
        s3_client.delete_object(Bucket=bucket, Key=s3_prefix + "manifest.json")
    else:
        s3_client.put_object(Bucket=bucket, Key=s3_prefix + "manifest.json", Body=b'{"format": "zip"}')
    before = tree_state(existing_workspace)
    run = run_script("restore", script_config(s3_server, s3_prefix, existing_workspace, overwrite=True))
    assert run.returncode != 0
    assert run.error_code == code, run.last
    assert tree_state(existing_workspace) == before
    assert staging_dirs(existing_workspace) == []


def upload_crafted(s3_client: Any, bucket: str, prefix: str, tar_bytes: bytes, part_size: int = 4096) -> None:
    """A hand-made snapshot (codec none): parts plus a manifest with correct sizes and hashes."""
    parts = []
    for i in range(0, len(tar_bytes), part_size):
        chunk = tar_bytes[i : i + part_size]
        digest = hashlib.sha256(chunk).hexdigest()
        key = "part-%05d" % len(parts)
        s3_client.put_object(Bucket=bucket, Key=prefix + key, Body=chunk)
        parts.append(
            {
                "index": len(parts),
                "key": key,
                "codec": "none",
                "raw_size": len(chunk),
                "stored_size": len(chunk),
                "sha256": digest,
                "raw_sha256": digest,
            }
        )
    manifest = {
        "format": "gpusnap-manifest",
        "version": 1,
        "snapshot_id": "evil",
        "instance_id": "evil",
        "codec": "none",
        "part_size": part_size,
        "parts": parts,
        "totals": {"raw_bytes": len(tar_bytes), "stored_bytes": len(tar_bytes), "parts": len(parts), "files": 2},
    }
    s3_client.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())


def evil_tar(kind: str, outside: str) -> bytes:
    buf = io.BytesIO()
    # POSIX format, as our snapshots are: the gate refuses GNU headers outright, the members must be
    # refused for what they are
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tar.addfile(root)
        ok = tarfile.TarInfo("./fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            evil = tarfile.TarInfo("./../" + os.path.basename(outside))
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"pwnd"))
        elif kind == "absolute":
            evil = tarfile.TarInfo(outside)
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"pwnd"))
        elif kind in ("symlink", "symlink-then-write"):
            link = tarfile.TarInfo("./escape")
            link.type = tarfile.SYMTYPE
            link.linkname = os.path.dirname(outside) if kind == "symlink-then-write" else "../../../etc"
            tar.addfile(link)
            if kind == "symlink-then-write":
                through = tarfile.TarInfo("./escape/" + os.path.basename(outside))
                through.size = 4
                tar.addfile(through, io.BytesIO(b"pwnd"))
        elif kind == "hardlink":
            link = tarfile.TarInfo("./hard")
            link.type = tarfile.LNKTYPE
            link.linkname = outside
            tar.addfile(link)
        elif kind == "device":
            dev = tarfile.TarInfo("./null")
            dev.type = tarfile.CHRTYPE
            dev.devmajor, dev.devminor = 1, 3
            tar.addfile(dev)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlink-then-write", "hardlink", "device"])
def test_unsafe_archive_is_refused(
    kind: str, tmp_path: Any, s3_server: Any, s3_prefix: str, s3_client: Any, existing_workspace: str
) -> None:
    outside = str(tmp_path / ("outside-" + uuid.uuid4().hex[:6]))
    upload_crafted(s3_client, s3_server.bucket, s3_prefix, evil_tar(kind, outside))
    before = tree_state(existing_workspace)
    # with external symlinks allowed, writing *through* one must still be refused
    cfg = script_config(
        s3_server, s3_prefix, existing_workspace, overwrite=True, allow_external_symlinks=kind == "symlink-then-write"
    )
    run = run_script("restore", cfg)
    assert run.returncode != 0
    assert run.error_code == "unsafe_archive", run.last
    assert not os.path.lexists(outside)
    assert tree_state(existing_workspace) == before
    assert staging_dirs(existing_workspace) == []


def test_wrong_credentials(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, existing_workspace: str
) -> None:
    cfg = script_config(s3_server, s3_prefix, existing_workspace, overwrite=True)
    cfg["s3"]["secret_key"] = "not-the-secret"
    run = run_script("restore", cfg)
    assert run.returncode != 0 and run.error_code == "storage_auth_failed", run.last


def test_bad_config(s3_server: Any, s3_prefix: str) -> None:
    run = run_script("restore", script_config(s3_server, s3_prefix, "relative/path"))
    assert run.returncode != 0 and run.error_code == "bad_config"


@pytest.fixture
def small_fs(tmp_path: Any) -> Iterator[Any]:
    """A real small filesystem (tmpfs) to run out of space on; skipped where mount is not allowed."""
    mounts: list[str] = []

    def make(name: str, options: str) -> str:
        path = str(tmp_path / name)
        os.makedirs(path)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True)
        if res.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): %s" % res.stderr.decode().strip())
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", path], check=False)


def test_insufficient_disk_is_refused_before_download(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, small_fs: Any
) -> None:
    fs = small_fs("tiny", "size=256k")
    target = os.path.join(fs, "ws")
    os.makedirs(os.path.join(target, "keep"))
    before = tree_state(target)
    run = run_script("restore", script_config(s3_server, s3_prefix, target, overwrite=True))
    assert run.error_code == "insufficient_disk", run.last
    assert not any(e.get("phase") == "download" for e in run.events)
    assert tree_state(target) == before and staging_dirs(target) == []


def test_disk_full_during_extraction(tmp_path: Any, s3_server: Any, s3_prefix: str, small_fs: Any) -> None:
    src = str(tmp_path / "many")
    os.makedirs(src)
    for i in range(200):
        open(os.path.join(src, "f%03d" % i), "w").close()
    assert run_script("snapshot", script_config(s3_server, s3_prefix, src)).returncode == 0
    fs = small_fs("few-inodes", "size=16m,nr_inodes=64")  # bytes are plenty, inodes are not: ENOSPC
    target = os.path.join(fs, "ws")
    os.makedirs(target)
    with open(os.path.join(target, "old.txt"), "w") as fh:
        fh.write("old")
    before = tree_state(target)
    run = run_script("restore", script_config(s3_server, s3_prefix, target, overwrite=True))
    assert run.error_code == "disk_full", run.last
    assert tree_state(target) == before and staging_dirs(target) == []


def test_restore_into_a_mount_point(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, small_fs: Any
) -> None:
    """A volume mounted at the workspace path cannot be renamed: staging goes inside it instead."""
    target = small_fs("volume", "size=64m")
    with open(os.path.join(target, "old.txt"), "w") as fh:
        fh.write("old")
    run = run_script("restore", script_config(s3_server, s3_prefix, target, overwrite=True))
    assert run.returncode == 0, run.stderr
    # The replaced workspace cannot leave the volume: it is kept inside it (snapshots exclude that name).
    old = run.last["previous_workspace"]
    assert kept_old(target) == [old] and os.path.dirname(old) == target
    assert sorted(os.listdir(old)) == ["old.txt"]
    root_mtime = os.stat(target).st_mtime_ns  # the archive's root entry, restored last
    shutil.rmtree(old)
    os.utime(target, ns=(root_mtime, root_mtime))
    assert tree_state(target) == restored_state(snapshot_of_tree["src"])
    assert os.path.ismount(target) and staging_dirs(target) == []


def test_a_manifest_other_than_the_recorded_one_is_refused(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, existing_workspace: str
) -> None:
    before = tree_state(existing_workspace)
    run = run_script(
        "restore", script_config(s3_server, s3_prefix, existing_workspace, overwrite=True, manifest_sha256="0" * 64)
    )
    assert run.returncode != 0 and run.last["code"] == "manifest_changed"
    assert tree_state(existing_workspace) == before
    recorded = snapshot_of_tree["result"]["manifest_sha256"]
    run = run_script(
        "restore", script_config(s3_server, s3_prefix, existing_workspace, overwrite=True, manifest_sha256=recorded)
    )
    assert run.returncode == 0, run.stderr


def test_zstd_planes_snapshot_round_trips_through_the_scripts(
    tmp_path: Any, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    import array
    import random

    src = str(tmp_path / "model")
    os.makedirs(src)
    rng = random.Random(3)
    f32 = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(300001))).tobytes()
    weights = bytearray(len(f32) // 2)
    weights[0::2], weights[1::2] = f32[2::4], f32[3::4]  # bf16: the high half of each float32
    with open(os.path.join(src, "model.bf16"), "wb") as fh:
        fh.write(weights)
    with open(os.path.join(src, "notes.txt"), "w") as fh:
        fh.write("odd length on purpose\n" * 999)
    snap = run_script("snapshot", script_config(s3_server, s3_prefix, src, codec="auto", part_size=1 << 20))
    assert snap.returncode == 0, snap.stderr
    target = str(tmp_path / "restored")
    run = run_script("restore", script_config(s3_server, s3_prefix, target))
    assert run.returncode == 0, run.stderr
    assert tree_state(target) == tree_state(src)
    manifest = json.loads(s3_client.get_object(Bucket=s3_server.bucket, Key=s3_prefix + "manifest.json")["Body"].read())
    codecs = [p["codec"] for p in manifest["parts"]]
    assert "zstd-planes" in codecs  # auto chose it for the weights (text vs planes: test_gs_planes.py)
    assert manifest["decode"] == {"requires_gpu": False}


def test_gpu_only_parts_are_refused_before_any_download_on_a_host_without_gpu(
    snapshot_of_tree: dict[str, Any], s3_server: Any, s3_prefix: str, s3_client: Any, existing_workspace: str
) -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this host has a CUDA driver: the refusal is for hosts without one")
    except OSError:
        pass
    key = s3_prefix + "manifest.json"
    manifest = json.loads(s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    manifest["parts"][1]["codec"] = "nvcomp-ans"  # as a GPU host writes it
    manifest["decode"] = {"requires_gpu": True, "nvcomp_major": 6}
    s3_client.put_object(Bucket=s3_server.bucket, Key=key, Body=json.dumps(manifest).encode())
    before = tree_state(existing_workspace)
    run = run_script("restore", script_config(s3_server, s3_prefix, existing_workspace, overwrite=True))
    assert run.error_code == "gpu_required", run.last
    assert "CUDA GPU" in run.last["message"]
    assert not any(e.get("phase") == "download" for e in run.events)
    assert tree_state(existing_workspace) == before and staging_dirs(existing_workspace) == []
