"""Snapshot format 2 for real: snapshot.py and restore.py as subprocesses, real SeaweedFS, GNU tar, s5cmd.

Byte-identical restores across a chain of changes, only changed chunks uploaded, a corrupted shared
chunk caught by every restore that uses it, a killed run resumed, v1 still restoring. The control
plane's part (known_chunks from its database) is simulated from the previous manifests, as the
control plane computes it: every chunk of a complete snapshot.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import time
from typing import Any

import pytest

from tests.support.fixtures_s3 import run_script, script_config, start_script, tree_state
from tests.support.trees import make_tricky_tree

pytestmark = pytest.mark.slow

SMALL = {
    "block_size": 256 * 1024,
    "large_min": 64 * 1024,
    "group_max": 256 * 1024,
    "group_modulus": 8,
    "pack_size": 512 * 1024,
}


def known_from(manifests: list[dict[str, Any]]) -> list[list[Any]]:
    """known_chunks as the control plane sends them: every chunk of these complete snapshots."""
    rows: dict[str, list[Any]] = {}
    for m in manifests:
        for c in m["chunks"]:
            obj = m["objects"][c["object"]]
            rows[c["raw_sha256"]] = [
                c["raw_sha256"],
                obj["key"],
                c["offset"],
                c["stored_size"],
                c["raw_size"],
                c["codec"],
                c["sha256"],
                obj["size"],
                obj["sha256"],
            ]
    return list(rows.values())


class Store:
    """One machine's store under a test prefix, and the snapshots taken into it."""

    def __init__(self, s3: Any, client: Any, base: str, **extra: Any) -> None:
        self.s3, self.client, self.store = s3, client, base + "m1/"
        self.extra = dict(SMALL, **extra)
        self.manifests: list[dict[str, Any]] = []
        self.n = 0

    def config(self, workspace: str, **extra: Any) -> dict[str, Any]:
        self.n += 1
        cfg = script_config(
            self.s3,
            "%ss%d/" % (self.store, self.n),
            workspace,
            format=2,
            store_prefix=self.store,
            known_chunks=known_from(self.manifests),
            **self.extra,
        )
        cfg.update(extra)
        return cfg

    def snapshot(self, workspace: str, **extra: Any) -> dict[str, Any]:
        cfg = self.config(workspace, **extra)
        run = run_script("snapshot", cfg, timeout=300)
        assert run.returncode == 0, run.stderr
        res = run.last
        body = self.client.get_object(Bucket=self.s3.bucket, Key=res["manifest_key"])["Body"].read()
        res["manifest"] = json.loads(body)
        res["prefix"] = cfg["prefix"]
        self.manifests.append(res["manifest"])
        return res

    def restore(self, res: dict[str, Any], target: str) -> Any:
        return run_script(
            "restore",
            script_config(
                self.s3,
                res["prefix"],
                target,
                store_prefix=self.store,
                manifest_sha256=res["manifest_sha256"],
                allow_external_symlinks=True,
            ),
            timeout=300,
        )


def check_restore(store: Store, res: dict[str, Any], src: pathlib.Path, target: pathlib.Path) -> None:
    run = store.restore(res, str(target))
    assert run.returncode == 0, run.stderr
    assert run.last["format"] == 2
    assert tree_state(str(target)) == tree_state(str(src))


def test_v2_snapshot_restores_identical_and_a_second_uploads_only_changes(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=3 << 20)
    for i in range(40):  # small files, several groups
        (src / "src" / "pkg" / ("data_%02d.txt" % i)).write_text(("line %d\n" % i) * 500)
    store = Store(s3_server, s3_client, s3_prefix)
    first = store.snapshot(str(src))
    m = first["manifest"]
    assert m["version"] == 2 and first["format"] == 2
    assert first["chunks_new"] == first["chunks"] - first["chunks_reused"] and first["chunks_new"] > 5
    assert {c["kind"] for c in m["chunks"]} == {"block", "group"}
    # gs_tuning sizes format 2 by its largest unit (a pack here), within the configured cap
    assert first["tuning"]["part_size"] == SMALL["pack_size"] and first["tuning"]["parallelism_cap"] == 4
    assert 1 <= first["tuning"]["parallelism_end"] <= first["tuning"]["parallelism_max"] <= 4
    assert all(o["key"].startswith("packs/") for o in m["objects"])  # runs of blocks and group packs
    runs = {c["object"] for c in m["chunks"] if c["kind"] == "block"}
    groups = {c["object"] for c in m["chunks"] if c["kind"] == "group"}
    assert runs and groups and not runs & groups  # a run never holds a group
    blocks = [c for c in m["chunks"] if c["kind"] == "block"]
    assert len(runs) < len(blocks)  # consecutive blocks share an object
    check_restore(store, first, src, tmp_path / "r1")

    again = store.snapshot(str(src))  # nothing changed: nothing uploaded
    assert again["chunks_new"] == 0 and again["bytes_uploaded"] == 0 and again["objects_uploaded"] == 0

    with open(src / "models" / "weights.bin", "ab") as fh:  # an append: the last block only
        fh.write(os.urandom(1000))
    os.utime(src / "src" / "pkg" / "mod_3.py", (1_800_000_000, 1_800_000_000))  # mtime-only touch
    second = store.snapshot(str(src))
    assert 1 <= second["chunks_new"] <= 4, second["manifest"]["chunks"]
    assert second["bytes_uploaded"] < 0.25 * first["bytes_uploaded"]
    check_restore(store, second, src, tmp_path / "r2")


def mutate(src: pathlib.Path, step: int) -> None:
    """One step of a chain of changes that together touch every kind of entry."""
    if step == 0:
        with open(src / "models" / "weights.bin", "ab") as fh:
            fh.write(os.urandom(300_000))
    elif step == 1:
        with open(src / "models" / "weights.bin", "r+b") as fh:  # a rewrite in the middle
            fh.seek(1 << 20)
            fh.write(os.urandom(4096))
        (src / "src" / "pkg" / "mod_7.py").write_text("rewritten\n")
    elif step == 2:
        (src / "src" / "pkg" / "mod_9.py").unlink()
        (src / "run.sh").rename(src / "run2.sh")
        os.link(src / "run2.sh", src / "run_hardlink")
    elif step == 3:
        os.utime(src / "secret.key", (1_750_000_000, 1_750_000_000))
        with open(src / "sparse2.img", "wb") as fh:
            fh.seek(3 << 20)
            fh.write(os.urandom(200_000))
            fh.truncate(9 << 20)
    elif step == 4:
        (src / "new_dir" / "deep").mkdir(parents=True)
        (src / "new_dir" / "deep" / ("x" * 150)).write_bytes(os.urandom(70_000))  # pax path
        shutil.copyfile(src / "models" / "weights.bin", src / "models" / "weights_copy.bin")  # repeated content


def test_chain_of_changes_restores_identical_at_each_step(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=2 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    results = [store.snapshot(str(src))]
    states = [tree_state(str(src))]
    for step in range(5):
        mutate(src, step)
        res = store.snapshot(str(src))
        assert res["chunks_reused"] > 0
        results.append(res)
        states.append(tree_state(str(src)))
    copy_run = results[-1]
    assert copy_run["chunks_new"] < copy_run["chunks"] / 2  # the copied file's blocks are the original's
    for i, res in enumerate(results):  # every snapshot in the chain restores as it was taken
        target = tmp_path / ("r%d" % i)
        run = store.restore(res, str(target))
        assert run.returncode == 0, run.stderr
        assert tree_state(str(target)) == states[i], "snapshot %d" % i


def test_corrupted_shared_chunk_fails_every_restore_that_uses_it(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=2 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    first = store.snapshot(str(src))
    (src / "zero").write_bytes(b"changed")
    second = store.snapshot(str(src))
    m1, m2 = first["manifest"], second["manifest"]
    shared = sorted({o["key"] for o in m1["objects"]} & {o["key"] for o in m2["objects"]})
    chunk = next(c for c in m1["chunks"] if c["kind"] == "block" and m1["objects"][c["object"]]["key"] in shared)
    key = store.store + m1["objects"][chunk["object"]]["key"]  # a run of blocks both snapshots use
    body = bytearray(s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    body[chunk["offset"] + chunk["stored_size"] // 2] ^= 0xFF  # same size: only the digest can tell
    s3_client.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(body))
    for i, res in enumerate((first, second)):
        target = tmp_path / ("r%d" % i)
        run = store.restore(res, str(target))
        assert run.returncode != 0 and run.error_code == "part_corrupt", run.events[-1]
        assert not target.exists() or not any(target.iterdir())  # nothing half-restored in place


def test_killed_run_is_resumed_reusing_what_it_uploaded(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(6):
        (src / "big" / ("w%d.bin" % i)).write_bytes(os.urandom(1 << 20))
    for i in range(200):
        (src / ("small_%03d.txt" % i)).write_bytes(os.urandom(3000))
    store = Store(s3_server, s3_client, s3_prefix, parallelism=2, codec="none")
    cfg = store.config(str(src))
    proc = start_script("snapshot", cfg)
    assert proc.stdout is not None
    done = 0
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event.get("parts_done", 0) >= 12:
            done = event["parts_done"]
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert done >= 12
    time.sleep(1.0)  # the killed script's s5cmd may finish the object it had opened
    listed = s3_client.list_objects_v2(Bucket=s3_server.bucket, Prefix=store.store + "packs/").get("KeyCount", 0)
    assert listed >= 1
    run = run_script("snapshot", cfg, timeout=300)  # the same snapshot again (a re-run of the job)
    assert run.returncode == 0, run.stderr
    res = run.last
    assert res["resumed_chunks"] >= listed
    assert res["bytes_uploaded"] < res["stored_bytes"]
    res["prefix"] = cfg["prefix"]
    check_restore(store, res, src, tmp_path / "restored")


def test_restore_of_v2_without_store_prefix_is_bad_config_and_v1_still_restores(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=1 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    res = store.snapshot(str(src))
    run = run_script("restore", script_config(s3_server, res["prefix"], str(tmp_path / "x")))
    assert run.error_code == "bad_config"
    v1 = run_script("snapshot", script_config(s3_server, s3_prefix + "v1/", str(src)))
    assert v1.returncode == 0 and "format" not in v1.last
    restored = run_script(
        "restore", script_config(s3_server, s3_prefix + "v1/", str(tmp_path / "v1"), allow_external_symlinks=True)
    )
    assert restored.returncode == 0, restored.stderr
    assert restored.last["format"] == 1
    assert tree_state(str(tmp_path / "v1")) == tree_state(str(src))


def test_missing_pack_is_part_missing_and_nothing_is_swapped_in(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=1 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    res = store.snapshot(str(src))
    pack = next(o["key"] for o in res["manifest"]["objects"] if o["key"].startswith("packs/"))
    s3_client.delete_object(Bucket=s3_server.bucket, Key=store.store + pack)
    target = tmp_path / "r"
    run = store.restore(res, str(target))
    assert run.error_code == "part_missing", run.events[-1]
    assert not target.exists() or not any(target.iterdir())


def test_rerun_after_a_crash_before_the_manifest_reuses_every_block_and_pack(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """A crash after the last upload but before the manifest: the control plane knows nothing of the
    objects (known_chunks is empty), the re-run finds them by listing, HEAD (blocks) and TOC (packs)."""
    src = make_tricky_tree(tmp_path / "src", big_bytes=2 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    cfg = store.config(str(src))
    first = run_script("snapshot", cfg, timeout=300)
    assert first.returncode == 0, first.stderr
    s3_client.delete_object(Bucket=s3_server.bucket, Key=first.last["manifest_key"])  # never committed
    again = run_script("snapshot", cfg, timeout=300)
    assert again.returncode == 0, again.stderr
    res = again.last
    manifest = json.loads(s3_client.get_object(Bucket=s3_server.bucket, Key=res["manifest_key"])["Body"].read())
    distinct = {c["raw_sha256"] for c in manifest["chunks"]}  # a repeated chunk (zero blocks) is found once
    assert res["resumed_packs"] >= 1 and res["resumed_chunks"] == len(distinct)
    assert res["bytes_uploaded"] == 0 and res["objects_uploaded"] == 0 and res["chunks_new"] == 0
    assert res["stored_bytes"] == first.last["stored_bytes"]
    res["prefix"] = cfg["prefix"]
    check_restore(store, res, src, tmp_path / "restored")


@pytest.mark.parametrize(
    "extra",
    [
        {"store_prefix": "elsewhere/m1/"},  # the snapshot prefix must be <store_prefix><id>/
        {"known_chunks": [["nothex", "chunks/" + "0" * 64, 0, 1, 1, "none", "0" * 64, 1, "0" * 64]]},
        {"known_chunks": [["0" * 64, "../x", 0, 1, 1, "none", "0" * 64, 1, "0" * 64]]},
        {"known_chunks": [["0" * 64, "packs/" + "0" * 64, 5, 10, 10, "none", "0" * 64, 12, "0" * 64]]},  # past the end
        {"block_size": 1000},
        {"format": 3},
    ],
)
def test_bad_format_2_config_is_bad_config(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any, extra: dict[str, Any]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = Store(s3_server, s3_client, s3_prefix).config(str(src), **extra)
    run = run_script("snapshot", cfg)
    assert run.error_code == "bad_config", run.events[-1]


def test_a_changed_middle_block_is_one_new_block_and_the_run_around_it_is_reused(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(8 * SMALL["block_size"]))  # 8 blocks: 4 runs of 2
    store = Store(s3_server, s3_client, s3_prefix, codec="none")
    first = store.snapshot(str(src))
    m1 = first["manifest"]
    blocks1 = [c for c in m1["chunks"] if c["kind"] == "block"]
    assert len(blocks1) == 8 and len({c["object"] for c in blocks1}) == 4
    with open(src / "big.bin", "r+b") as fh:
        fh.seek(5 * SMALL["block_size"] + 100)
        fh.write(os.urandom(100))
    second = store.snapshot(str(src))
    m2 = second["manifest"]
    blocks2 = [c for c in m2["chunks"] if c["kind"] == "block"]
    assert [c["new"] for c in blocks2] == [i == 5 for i in range(8)]
    old_keys = {o["key"] for o in m1["objects"]}
    new_run = m2["objects"][blocks2[5]["object"]]["key"]
    assert new_run not in old_keys  # a run of its own: the unchanged blocks were not stored again
    assert {m2["objects"][c["object"]]["key"] for i, c in enumerate(blocks2) if i != 5} <= old_keys
    assert second["bytes_uploaded"] < 2 * SMALL["block_size"]
    check_restore(store, second, src, tmp_path / "r2")


def old_layout(store: Store, res: dict[str, Any], manifest_too: bool = True) -> dict[str, Any]:
    """Rewrite a snapshot into the layout of the first format-2 writer: every block its own object
    `chunks/<raw sha256>` (with that writer's metadata), the manifest pointing there. Returns the
    rewritten result (manifest uploaded when `manifest_too`)."""
    import hashlib

    m = res["manifest"]
    objects: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    chunks = []
    bodies: dict[str, bytes] = {}
    for c in m["chunks"]:
        obj = m["objects"][c["object"]]
        c = dict(c)
        if c["kind"] == "block":
            if obj["key"] not in bodies:
                got = store.client.get_object(Bucket=store.s3.bucket, Key=store.store + obj["key"])
                bodies[obj["key"]] = got["Body"].read()
            stored = bodies[obj["key"]][c["offset"] : c["offset"] + c["stored_size"]]
            obj = {"key": "chunks/" + c["raw_sha256"], "size": len(stored), "sha256": c["sha256"]}
            store.client.put_object(
                Bucket=store.s3.bucket,
                Key=store.store + obj["key"],
                Body=stored,
                Metadata={
                    "sha256": c["sha256"],
                    "raw-sha256": c["raw_sha256"],
                    "raw-size": str(c["raw_size"]),
                    "stored-size": str(len(stored)),
                    "codec": c["codec"],
                },
            )
            c["offset"] = 0
        if obj["key"] not in index:
            index[obj["key"]] = len(objects)
            objects.append(obj)
        c["object"] = index[obj["key"]]
        chunks.append(c)
    for key in bodies:  # the runs are gone: only the old layout can serve the blocks
        store.client.delete_object(Bucket=store.s3.bucket, Key=store.store + key)
    m = dict(m, objects=objects, chunks=chunks)
    m["totals"] = dict(m["totals"], objects=len(objects), stored_bytes=sum(o["size"] for o in objects))
    body = json.dumps(m).encode()
    if manifest_too:
        store.client.put_object(Bucket=store.s3.bucket, Key=res["manifest_key"], Body=body)
    return dict(res, manifest=m, manifest_sha256=hashlib.sha256(body).hexdigest())


def test_an_old_layout_snapshot_restores_and_its_blocks_are_reused(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = make_tricky_tree(tmp_path / "src", big_bytes=2 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    old = old_layout(store, store.snapshot(str(src)))
    store.manifests[-1] = old["manifest"]  # what the control plane's database holds of it
    assert any(o["key"].startswith("chunks/") for o in old["manifest"]["objects"])
    check_restore(store, old, src, tmp_path / "r1")
    with open(src / "models" / "weights.bin", "ab") as fh:
        fh.write(os.urandom(1000))
    new = store.snapshot(str(src))  # reuses the old block objects, stores the changed block in a run
    keys = {o["key"] for o in new["manifest"]["objects"]}
    assert any(k.startswith("chunks/") for k in keys) and new["chunks_new"] <= 3
    check_restore(store, new, src, tmp_path / "r2")


def test_a_crashed_old_writer_s_block_objects_are_resumed(
    tmp_path: pathlib.Path, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    """The older writer crashed before its manifest: its `chunks/<raw>` objects are found (HEAD,
    then the bytes checked) and reused by today's writer."""
    src = make_tricky_tree(tmp_path / "src", big_bytes=2 << 20)
    store = Store(s3_server, s3_client, s3_prefix)
    cfg = store.config(str(src))
    first = run_script("snapshot", cfg, timeout=300)
    assert first.returncode == 0, first.stderr
    res = dict(first.last, prefix=cfg["prefix"])
    res["manifest"] = json.loads(s3_client.get_object(Bucket=s3_server.bucket, Key=res["manifest_key"])["Body"].read())
    old_layout(store, res, manifest_too=False)
    s3_client.delete_object(Bucket=s3_server.bucket, Key=res["manifest_key"])  # never committed
    again = run_script("snapshot", cfg, timeout=300)
    assert again.returncode == 0, again.stderr
    blocks = {c["raw_sha256"] for c in res["manifest"]["chunks"] if c["kind"] == "block"}
    assert again.last["resumed_chunks"] >= len(blocks) and again.last["chunks_new"] == 0
    check_restore(store, dict(again.last, prefix=cfg["prefix"]), src, tmp_path / "restored")
