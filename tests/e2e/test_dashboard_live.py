"""The dashboard's live parts end to end: a real snapshot job (worker process, loopback sshd, SeaweedFS
behind a proxy that makes each part's upload take a while) followed over `GET /api/events` by an HTTP
client that reconnects half-way with Last-Event-ID, and the status page at `/` in a real headless
Chromium, whose progress bar moves with the stream until the job ends `succeeded`."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.cdp import Browser
from tests.support.fixtures_e2e import TOKEN
from tests.support.slow_s3_proxy import SlowS3Proxy

pytestmark = pytest.mark.slow
# 1 MiB files, uploaded one object at a time, each PUT held PUT_DELAY_S. Format 2 stores a file's new
# blocks in runs of up to 16 blocks (gs_packer): 40 of them make three runs, so the upload's progress
# moves at least twice while the PUTs are held.
PARTS = 40
PUT_DELAY_S = 0.6


def _workspace(root: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True)
    for i in range(PARTS):  # random bytes: no codec shrinks them
        (root / f"shard-{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    return root


def _slow_worker(stack, proxy: SlowS3Proxy) -> None:  # type: ignore[no-untyped-def]
    stack.stop_worker()
    stack.start_worker(R2_ENDPOINT=proxy.endpoint, SNAPSHOT_PARALLELISM="1")


def _snapshot(stack, sshd, workspace: pathlib.Path, machine_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": machine_id,
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(workspace),
        },
    )
    assert r.status_code == 202, r.text
    return r.json()


def sse(resp: requests.Response) -> Iterator[dict[str, Any]]:
    """The events of an SSE response as they arrive (comments skipped)."""
    event: dict[str, Any] = {}
    for line in resp.iter_lines(decode_unicode=True):
        if line == "":
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = value


def _ended(e: dict[str, Any]) -> bool:
    return e["event"] == "job.status" and e["data"]["job"]["status"] in ("succeeded", "failed", "cancelled")


def _read(resp: requests.Response, stop, *, timeout: float = 180) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    got, deadline = [], time.monotonic() + timeout
    for e in sse(resp):
        got.append(e)
        if stop(e):
            return got
        assert time.monotonic() < deadline, [x["event"] for x in got]
    raise AssertionError(f"stream ended early after {[x['event'] for x in got]}")


def test_an_sse_client_follows_a_snapshot_in_order_and_resumes_after_a_reconnect(stack, sshd, s3_server, tmp_path):
    workspace = _workspace(tmp_path / "workspace")
    with SlowS3Proxy(s3_server.endpoint, put_delay_s=PUT_DELAY_S) as proxy:
        _slow_worker(stack, proxy)
        token = stack.post("/api/stream-tokens").json()["token"]  # as a browser would: no Authorization header
        first = requests.get(
            f"{stack.url}/api/events", params={"token": token, "machine_id": "sse-1"}, stream=True, timeout=30
        )
        assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/event-stream")
        created = _snapshot(stack, sshd, workspace, "sse-1")
        # Part one: up to the first progress report of the upload; then the connection drops.
        part1 = _read(first, lambda e: e["event"] == "job.progress" and e["data"]["job"]["phase"] == "upload")
        first.close()
        still = stack.get(f"/api/jobs/{created['job']['id']}").json()
        assert still["status"] == "running", "the job ended before the reconnect: the upload is not slow enough"
        second = requests.get(
            f"{stack.url}/api/events",
            params={"machine_id": "sse-1"},
            stream=True,
            timeout=30,
            headers={"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": part1[-1]["id"]},
        )
        part2 = _read(second, _ended)
        second.close()
    # The whole story, read again from the start of the log: the two parts are exactly it.
    replay = requests.get(
        f"{stack.url}/api/events",
        params={"machine_id": "sse-1", "last_event_id": 0},
        stream=True,
        timeout=30,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    whole = _read(replay, _ended)
    replay.close()
    assert [e["id"] for e in part1 + part2] == [e["id"] for e in whole]
    assert [e["data"] for e in part1 + part2] == [e["data"] for e in whole]

    ids = [int(e["id"]) for e in whole]
    assert ids == sorted(set(ids))
    jobs = [e["data"]["job"] for e in whole if e["event"].startswith("job.")]
    assert {j["id"] for j in jobs} == {created["job"]["id"]}
    assert [j["status"] for j in jobs if j["status"] != "running"] == ["queued", "succeeded"]
    phases = [
        j["phase"]
        for e, j in zip([e for e in whole if e["event"].startswith("job.")], jobs)
        if e["event"] == "job.phase"
    ]
    assert phases[0] == "connect" and phases.index("upload") < phases.index("manifest"), phases
    upload = [
        j["progress"]["bytes_done"]
        for e, j in zip([e for e in whole if e["event"].startswith("job.")], jobs)
        if e["event"] == "job.progress" and j["phase"] == "upload"
    ]
    assert len(set(upload)) >= 2 and upload == sorted(upload), upload  # it moved, and only forwards
    final = jobs[-1]["progress"]
    assert final["parts_done"] == final["parts_total"] >= 1  # format 2 counts the objects it wrote
    assert final["bytes_done"] == final["bytes_total"] >= PARTS << 20
    machine_kinds = [e["data"]["event"]["kind"] for e in whole if e["event"] == "machine.event"]
    assert machine_kinds[:2] == ["registered", "create_snapshot_requested"] and "snapshot_complete" in machine_kinds


def test_the_status_page_shows_a_jobs_progress_moving_until_it_succeeds(stack, sshd, s3_server, tmp_path):
    workspace = _workspace(tmp_path / "workspace")
    page = requests.get(stack.url + "/", timeout=10)
    assert page.status_code == 200 and "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    assert "<script" in page.text and "src=" not in page.text.split("<script", 1)[1].split(">", 1)[0]  # inline

    browser = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.navigate(stack.url + "/")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('message').textContent")
        assert browser.evaluate("document.getElementById('message').textContent") == "enter an API token"
        browser.evaluate(
            f"document.getElementById('token-input').value = {json.dumps(TOKEN)};"
            "document.getElementById('token-form').requestSubmit(); true"
        )
        browser.wait_for("document.getElementById('live').textContent === '(live)'")
        assert browser.evaluate("sessionStorage.getItem('gpusnap.token')") == TOKEN
        assert browser.evaluate("localStorage.length") == 0 and TOKEN not in browser.evaluate("location.href")

        with SlowS3Proxy(s3_server.endpoint, put_delay_s=PUT_DELAY_S) as proxy:
            _slow_worker(stack, proxy)
            job_id = _snapshot(stack, sshd, workspace, "page-1")["job"]["id"]
            row = f"document.querySelector('#jobs tr[data-job-id=\"{job_id}\"]')"
            seen: list[tuple[str, str, int, int]] = []
            deadline = time.monotonic() + 180
            while True:
                state = browser.evaluate(
                    f"(() => {{ const r = {row}; return r ? [r.dataset.status, r.dataset.phase, "
                    f"+r.dataset.done, +r.dataset.total] : null; }})()"
                )
                if state and (not seen or tuple(state) != seen[-1]):
                    seen.append(tuple(state))
                if state and state[0] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, seen
                time.sleep(0.05)
        assert seen[-1][0] == "succeeded", seen
        uploading = [done for status, phase, done, total in seen if status == "running" and phase == "upload"]
        assert len(set(uploading)) >= 2 and uploading == sorted(uploading), seen  # the bar moved, forwards
        assert (
            browser.evaluate(f"{row}.querySelector('progress').value")
            == browser.evaluate(f"{row}.querySelector('progress').max")
            > 0
        )
        # The rest of the page: the machine with its costs and latest snapshot, the totals.
        browser.wait_for(
            "document.querySelector('#machines tr[data-machine-id=\"page-1\"]') && "
            "document.querySelector('#machines tr[data-machine-id=\"page-1\"]').textContent"
            ".includes('complete')"
        )
        assert "saved by hibernating" in browser.evaluate("document.getElementById('summary').textContent")
        assert browser.evaluate("document.getElementById('message').textContent") == ""
    finally:
        browser.close()
