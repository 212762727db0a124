"""GPU hosts receive per-job credentials, never the bucket's own key pair (issue: keys on rented hosts).

The whole path runs for real: the API and a worker process, the loopback sshd as the GPU host, SeaweedFS
as the bucket, and the fake Cloudflare API (tests/fakes/fake_cloudflare_api.py) minting the credentials.
Each minted key is made real on SeaweedFS with exactly the scope that was asked for (read, or read and
write, under the one prefix), so a script that needed anything outside its prefix would fail here.

REMOTE_S5CMD points to a wrapper that records the environment s5cmd is started with on the host (the
proof of what the host received), then runs the real s5cmd without AWS_SESSION_TOKEN: SeaweedFS reads any
session token as a JWT of its own STS and refuses the key otherwise; R2 needs the token, and the
wrapper's record shows that the host got it.
"""

from __future__ import annotations

import pathlib
import stat

import pytest

from src.migrate import upgrade
from tests.fakes.fake_cloudflare_api import FakeCloudflareApi, Minted
from tests.support.fixtures_e2e import Stack, stack_env
from tests.support.s3_server import add_identity, s5cmd_binary
from tests.support.trees import describe_tree, make_tricky_tree

pytestmark = pytest.mark.slow

ACCOUNT = "0123456789abcdef0123456789abcdef"
API_TOKEN = "cf-api-token-for-tests"


def _recording_s5cmd(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    records = tmp_path / "s5cmd-env"
    records.mkdir()
    wrapper = tmp_path / "s5cmd-recording"
    wrapper.write_text(
        "#!/bin/sh\n"
        '[ "$*" = version ] || '  # the manifest records the tool's version: no bucket call
        f"env | grep '^AWS_' > '{records}/'$$\n"
        "unset AWS_SESSION_TOKEN\n"
        f"exec '{s5cmd_binary()}' \"$@\"\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper, records


def _grant_on_seaweed(s3_server):  # type: ignore[no-untyped-def]
    def grant(minted: Minted) -> None:
        scope = [f"{s3_server.bucket}/{p}*" for p in minted.body.get("prefixes", [])]
        actions = [f"Read:{s}" for s in scope] + [f"List:{s}" for s in scope]
        if minted.body["permission"] == "object-read-write":
            actions += [f"Write:{s}" for s in scope]
        add_identity(
            s3_server,
            name=minted.access_key.lower(),
            access_key=minted.access_key,
            secret_key=minted.secret_key,
            actions=actions,
        )

    return grant


@pytest.fixture
def scoped_stack(tmp_path, sshd, s3_server, s3_prefix, fake_vast):  # type: ignore[no-untyped-def]
    cloudflare = FakeCloudflareApi(
        account_id=ACCOUNT,
        api_token=API_TOKEN,
        bucket=s3_server.bucket,
        parent_access_key=s3_server.access_key,
        on_mint=_grant_on_seaweed(s3_server),
    )
    wrapper, records = _recording_s5cmd(tmp_path)
    env = {
        **stack_env(tmp_path, sshd, s3_server, s3_prefix, fake_vast),
        "CLOUDFLARE_ACCOUNT_ID": ACCOUNT,
        "CLOUDFLARE_API_TOKEN": API_TOKEN,
        "CLOUDFLARE_API_URL": cloudflare.base_url,
        "REMOTE_S5CMD": str(wrapper),
    }
    upgrade(env["DATABASE_URL"])
    with cloudflare:
        stack = Stack(env=env, tmp=tmp_path)
        stack.start_worker()
        try:
            yield stack, cloudflare, records
        finally:
            stack.close()


def _host_environments(records: pathlib.Path) -> list[dict[str, str]]:
    envs = []
    for f in sorted(records.iterdir()):
        envs.append(dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line))
    return envs


def test_hosts_get_minted_prefix_scoped_credentials_never_the_parent_key(scoped_stack, sshd, s3_server, tmp_path):
    stack, cloudflare, records = scoped_stack
    workspace = make_tricky_tree(tmp_path / "workspace")
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": "scoped-1",
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(workspace),
        },
    )
    assert r.status_code == 202, r.text
    snap_id = r.json()["snapshot"]["id"]
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    snap = stack.get(f"/api/gpu-snapshots/{snap_id}").json()

    target = tmp_path / "restored"
    r = stack.post(
        f"/api/gpu-snapshots/{snap_id}/restore",
        json={"ssh_host": sshd.host, "ssh_port": sshd.port, "workspace_path": str(target)},
    )
    assert r.status_code == 202, r.text
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    assert describe_tree(target) == describe_tree(workspace)

    # What was asked of Cloudflare: the bucket, exactly this snapshot's store, write only for the snapshot.
    asked = [m.body for m in cloudflare.minted]
    assert [b["permission"] for b in asked] == ["object-read-write", "object-read-only"]
    # Format 2: the machine's chunk store (the parent of the snapshot's prefix), shared by its snapshots.
    prefix = snap["storage_prefix"] if snap["format"] == 1 else snap["storage_prefix"][: -len(snap_id) - 1]
    for body in asked:
        assert body["bucket"] == s3_server.bucket and body["prefixes"] == [prefix]
        assert body["parentAccessKeyId"] == s3_server.access_key
        assert body["ttlSeconds"] >= 3600  # at least the job's deadline (checked exactly in the unit tests)

    # What the host received: only minted keys, each with its session token; never the parent pair.
    envs = _host_environments(records)
    assert envs, "the recording s5cmd never ran"
    minted = {m.access_key: m for m in cloudflare.minted}
    for env in envs:
        key = env["AWS_ACCESS_KEY_ID"]
        assert key in minted, f"the host ran s5cmd with a key that was not minted: {key}"
        assert env["AWS_SECRET_ACCESS_KEY"] == minted[key].secret_key
        assert env["AWS_SESSION_TOKEN"] == minted[key].session_token
    dumped = "".join(f.read_text() for f in records.iterdir())
    assert s3_server.access_key not in dumped and s3_server.secret_key not in dumped

    ready = stack.get("/readyz").json()
    assert ready["details"]["host_credentials"].startswith("scoped")


def test_a_refused_mint_fails_the_job_and_never_falls_back_to_the_parent_key(scoped_stack, sshd, tmp_path):
    stack, cloudflare, records = scoped_stack
    cloudflare.api_token = "rotated-token"  # the configured token no longer works
    workspace = make_tricky_tree(tmp_path / "workspace")
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": "scoped-2",
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(workspace),
        },
    )
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "credentials_unavailable", job
    assert "CLOUDFLARE_API_TOKEN" in job["error"]["message"]
    assert list(records.iterdir()) == [], "s5cmd ran on the host although no scoped credentials were minted"
