"""snapshot.py for real: local subprocess, real SeaweedFS, real GNU tar and s5cmd.

Manifest last and complete, resume after SIGKILL uploads only what is missing, credentials never
in any argv, cancellation, a vanished reader, excludes, bad config, wrong credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from typing import Any

import pytest

from tests.support.fixtures_s3 import finish_script, run_script, script_config, start_script, tree_state

pytestmark = pytest.mark.slow


def keys(s3_client: Any, bucket: str, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) :]] = item["Size"]
    return out


def random_tree(root: str, files: int = 40, size: int = 48 * 1024) -> None:
    os.makedirs(os.path.join(root, "sub"))
    for i in range(files):
        with open(os.path.join(root, "sub" if i % 2 else "", "f%03d.bin" % i), "wb") as fh:
            fh.write(os.urandom(size))


def test_snapshot_writes_parts_then_a_valid_manifest(
    tmp_path: Any, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = str(tmp_path / "src")
    random_tree(src, files=10)
    with open(os.path.join(src, "text.log"), "w") as fh:
        fh.write("step=1 loss=2.0\n" * 20000)
    run = run_script("snapshot", script_config(s3_server, s3_prefix, src))
    assert run.returncode == 0, run.stderr
    events = [e["event"] for e in run.events]
    assert events[0] == "started" and events[-1] == "result" and "progress" in events
    assert run.events[0]["pid"] > 0 and run.events[0]["pgid"] > 0
    res = run.last
    assert res["uploaded_parts"] == res["parts"] and res["skipped_parts"] == 0
    assert res["files"] == 12  # archive entries but the root: 10 files, sub/, text.log
    assert res["manifest_key"] == s3_prefix + "manifest.json"
    body = s3_client.get_object(Bucket=s3_server.bucket, Key=res["manifest_key"])["Body"].read()
    manifest = json.loads(body)
    assert hashlib.sha256(body).hexdigest() == res["manifest_sha256"]
    assert manifest["format"] == "gpusnap-manifest" and manifest["version"] == 1
    assert manifest["snapshot_id"] == "snap-test" and manifest["totals"]["parts"] == res["parts"]
    codecs = {p["codec"] for p in manifest["parts"]}
    assert codecs == {"zstd", "none"}  # random data is stored raw, the log compresses
    listed = keys(s3_client, s3_server.bucket, s3_prefix)
    for part in manifest["parts"]:
        assert listed[part["key"]] == part["stored_size"]
    assert res["raw_bytes"] == sum(p["raw_size"] for p in manifest["parts"])
    progress = [e for e in run.events if e["event"] == "progress"]
    assert {"phase", "bytes_done", "bytes_total", "parts_done", "parts_total"} <= set(progress[0])


def test_resume_after_sigkill_uploads_only_missing_parts(
    tmp_path: Any, s3_server: Any, s3_prefix: str, s3_client: Any
) -> None:
    src = str(tmp_path / "src")
    random_tree(src, files=40)  # ~2 MiB of random data -> ~60 parts of 32 KiB
    cfg = script_config(s3_server, s3_prefix, src, part_size=32 * 1024, parallelism=2, codec="none")
    proc = start_script("snapshot", cfg)
    assert proc.stdout is not None
    done = 0
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event.get("parts_done", 0) >= 8:
            done = event["parts_done"]
            proc.send_signal(signal.SIGKILL)  # the script only: its s5cmd children may still finish
            break
    proc.wait()
    assert done >= 8
    time.sleep(1.0)
    before = keys(s3_client, s3_server.bucket, s3_prefix)
    assert "manifest.json" not in before and len(before) >= done
    run = run_script("snapshot", cfg)
    assert run.returncode == 0, run.stderr
    res = run.last
    assert res["skipped_parts"] >= done
    assert res["uploaded_parts"] + res["skipped_parts"] == res["parts"]
    assert res["uploaded_parts"] < res["parts"]
    target = str(tmp_path / "restored")
    restored = run_script("restore", script_config(s3_server, s3_prefix, target))
    assert restored.returncode == 0, restored.stderr
    assert tree_state(target) == tree_state(src)
    again = run_script("snapshot", cfg)  # a complete snapshot re-run uploads nothing at all
    assert again.last["skipped_parts"] == again.last["parts"] and again.last["uploaded_parts"] == 0


def _cmdlines() -> list[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as fh:
                    out.append(fh.read())
            except OSError:
                continue
    return out


def test_credentials_never_appear_in_argv(tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    src = str(tmp_path / "src")
    random_tree(src, files=30)
    cfg = script_config(s3_server, s3_prefix, src, part_size=16 * 1024, parallelism=4)
    secrets = [s3_server.secret_key.encode(), s3_server.access_key.encode()]
    seen: set[bytes] = set()
    stop = threading.Event()
    s5cmd_seen = [0]

    def poll() -> None:
        while not stop.is_set():
            for cmd in _cmdlines():
                if b"s5cmd" in cmd:
                    s5cmd_seen[0] += 1
                seen.update(s for s in secrets if s in cmd)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    run = run_script("snapshot", cfg)
    restore = run_script("restore", script_config(s3_server, s3_prefix, str(tmp_path / "out")))
    stop.set()
    thread.join()
    assert run.returncode == 0 and restore.returncode == 0
    assert s5cmd_seen[0] > 0, "the poller never caught an s5cmd process; the check proved nothing"
    assert not seen
    for text in (run.stderr, restore.stderr, json.dumps(run.events), json.dumps(restore.events)):
        assert s3_server.secret_key not in text


def test_sigterm_cancels_and_kills_children(tmp_path: Any, s3_server: Any, s3_prefix: str, s3_client: Any) -> None:
    src = str(tmp_path / "src")
    random_tree(src, files=60)
    proc = start_script("snapshot", script_config(s3_server, s3_prefix, src, part_size=16 * 1024, parallelism=2))
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    assert started["event"] == "started"
    for line in proc.stdout:
        if json.loads(line).get("parts_done", 0) >= 2:
            break
    os.killpg(started["pgid"], signal.SIGTERM)  # what the control plane does
    run = finish_script(proc, timeout=30)
    assert run.returncode != 0
    assert run.error_code == "cancelled", run.last
    time.sleep(0.5)
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == started["pgid"]]
    assert leftovers == []
    assert "manifest.json" not in keys(s3_client, s3_server.bucket, s3_prefix)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def test_stops_when_stdout_reader_goes_away(tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    src = str(tmp_path / "src")
    random_tree(src, files=60)
    proc = start_script("snapshot", script_config(s3_server, s3_prefix, src, part_size=16 * 1024, parallelism=2))
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # the control plane vanished
    assert proc.wait(timeout=30) != 0


def test_excludes(tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, ".cache", "pip"))
    os.makedirs(os.path.join(src, "code"))
    for rel in ("keep.txt", "scratch.tmp", "code/a.py", "code/b.tmp", ".cache/pip/wheel"):
        with open(os.path.join(src, rel), "w") as fh:
            fh.write(rel)
    run = run_script("snapshot", script_config(s3_server, s3_prefix, src, excludes=["*.tmp", ".cache"]))
    assert run.returncode == 0, run.stderr
    target = str(tmp_path / "out")
    assert run_script("restore", script_config(s3_server, s3_prefix, target)).returncode == 0
    found = sorted(os.path.relpath(os.path.join(d, f), target) for d, _, fs in os.walk(target) for f in fs)
    assert found == ["code/a.py", "keep.txt"]


@pytest.mark.parametrize(
    "change,code",
    [
        ({"workspace_path": None}, "bad_config"),
        ({"codec": "lzma"}, "bad_config"),
        ({"part_size": 10}, "bad_config"),
        ({"parallelism": "8"}, "bad_config"),
        ({"prefix": "/abs/"}, "bad_config"),
        ({"workspace_path": "/nonexistent/gpusnap-ws"}, "workspace_not_found"),
    ],
)
def test_bad_config(change: dict[str, Any], code: str, tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    cfg = script_config(s3_server, s3_prefix, str(tmp_path))
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    run = run_script("snapshot", cfg)
    assert run.returncode != 0 and run.error_code == code, run.last


def test_stdin_not_json_is_bad_config() -> None:
    run = run_script("snapshot", b"{not json")
    assert run.returncode != 0 and run.error_code == "bad_config"
    assert [e["event"] for e in run.events] == ["started", "error"]


def test_wrong_credentials(tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    cfg = script_config(s3_server, s3_prefix, str(tmp_path))
    cfg["s3"]["secret_key"] = "wrong-secret"
    run = run_script("snapshot", cfg)
    assert run.returncode != 0 and run.error_code == "storage_auth_failed", run.last
    assert "wrong-secret" not in run.stderr + json.dumps(run.events)


def test_missing_s5cmd_is_missing_dependency(tmp_path: Any, s3_server: Any, s3_prefix: str) -> None:
    for script in ("snapshot", "restore"):
        run = run_script(script, script_config(s3_server, s3_prefix, str(tmp_path), s5cmd="/nonexistent/s5cmd"))
        assert run.returncode != 0 and run.error_code == "missing_dependency", run.last
