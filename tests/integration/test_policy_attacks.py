"""An outside tester's attacks on machine policies (issue 11) that found something: each test is a
repro that failed before its fix. The scheduler's `tick` runs with an explicit clock, as in
tests/integration/test_policies.py."""

from __future__ import annotations

import time

from src.db import transaction
from src.models import Machine, Snapshot
from src.services.retention import apply_retention
from tests.support.fixtures_app import AUTH
from tests.support.snapshots import add_complete_snapshot


def _machine(app, machine_id: str = "m1") -> None:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id=machine_id, status="running", ssh_host="127.0.0.1", ssh_port=22, workspace_path="/workspace"))


def _snapshot_of(app, store, path: str) -> str:  # type: ignore[no-untyped-def]
    snap_id = add_complete_snapshot(app, store, machine_id="m1", parts=1)["id"]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Snapshot, snap_id).workspace_path = path
    time.sleep(0.002)  # ids order by creation only across milliseconds
    return snap_id


def test_retention_counts_each_workspace_path_apart(app, client, store):  # type: ignore[no-untyped-def]
    """restic's forget groups snapshots by host and paths before it applies the keep rules (`--group-by`
    defaults to `host,paths`). Without that, keep_last 1 and one manual snapshot of another directory
    (a dataset, a subdirectory) deleted the machine's only snapshot of its workspace."""
    c = app.extensions["gpusnap"]
    _machine(app)
    workspace = [_snapshot_of(app, store, "/workspace") for _ in range(2)]
    data = _snapshot_of(app, store, "/data")  # a manual snapshot of another path, newest of all
    r = client.put("/api/instances/m1/policy", json={"retention": {"keep_last": 1}}, headers=AUTH)
    assert r.status_code == 200, r.get_json()
    deleting = apply_retention(c, "m1")
    assert deleting == [workspace[0]]  # the older /workspace one only
    kept = app.extensions["gpusnap"]
    with transaction(kept.session_factory) as s:
        assert s.get(Snapshot, workspace[1]).status == "complete" and s.get(Snapshot, data).status == "complete"


def test_a_hanging_probe_does_not_hold_up_other_machines_policies(tmp_path, database_url, store, sshd, monkeypatch):  # type: ignore[no-untyped-def]
    """A hostile host that lets the probe in and then never answers (the silent SSH server of issue 9)
    held the whole tick for the probe's deadline: the machines after it got their scheduled snapshot and
    their samples that much later, and N such hosts held it N times over. Now schedules run first and
    the machines are probed side by side; the silent one still ends as a failed (busy) sample."""
    import datetime as dt
    import threading

    from src.app import create_app
    from src.jobs import idle_probe
    from src.jobs.scheduler import tick
    from src.models import Job, MachineEvent, utcnow
    from tests.support.fixtures_app import make_settings
    from tests.support.silent_ssh_server import SilentSshServer

    deadline_s = 15.0
    monkeypatch.setattr(idle_probe, "PROBE_DEADLINE_S", deadline_s)
    app = create_app(
        make_settings(tmp_path, database_url, ssh_key_path=sshd.client_key_path),
        object_store=store,
        configure_logs=False,
    )
    c = app.extensions["gpusnap"]
    client = app.test_client()
    idle = {"idle": {"action": "notify", "for_s": 60, "sample_every_s": 60}}
    with SilentSshServer(authorized_key_path=sshd.client_key_path, mode="exec") as silent:
        with transaction(c.session_factory) as s:
            s.add(
                Machine(
                    id="a-hostile",
                    status="running",
                    ssh_host=silent.host,
                    ssh_port=silent.port,
                    workspace_path="/workspace",
                )
            )
            s.add(
                Machine(
                    id="b-scheduled", status="running", ssh_host="127.0.0.1", ssh_port=22, workspace_path="/workspace"
                )
            )
            s.add(Machine(id="c-sampled", status="running", workspace_path="/workspace"))  # no endpoint: fails fast
        for machine_id, body in (("a-hostile", idle), ("b-scheduled", {"schedule": "* * * * *"}), ("c-sampled", idle)):
            r = client.put(f"/api/instances/{machine_id}/policy", json=body, headers=AUTH)
            assert r.status_code == 200, r.get_json()
        now = utcnow() + dt.timedelta(minutes=1)
        reports: list[dict] = []
        ticking = threading.Thread(target=lambda: reports.append(tick(c, now=now)))
        ticking.start()
        try:
            limit = time.monotonic() + 60
            while silent.held == 0:  # the hostile probe is now stuck on a request never answered
                assert time.monotonic() < limit and ticking.is_alive(), "the probe never reached the host"
                time.sleep(0.05)
            stuck_at = time.monotonic()

            def others_done() -> bool:
                with transaction(c.session_factory) as s:
                    job = s.query(Job).filter_by(machine_id="b-scheduled", kind="create_snapshot").first()
                    sample = s.query(MachineEvent).filter_by(machine_id="c-sampled", kind="idle_sample").first()
                    return job is not None and sample is not None

            while not others_done():
                assert time.monotonic() - stuck_at < deadline_s / 3, "the other machines waited for the hanging probe"
                time.sleep(0.05)
        finally:
            ticking.join(timeout=deadline_s * 4)
        assert not ticking.is_alive() and reports
        assert sorted(reports[0]["sampled"]) == ["a-hostile", "c-sampled"]
        with transaction(c.session_factory) as s:
            (event,) = s.query(MachineEvent).filter_by(machine_id="a-hostile", kind="idle_sample").all()
            assert event.data["ok"] is False  # the host that never answered is busy, never idle
    c.engine.dispose()


def test_an_idle_pause_never_stops_an_instance_other_than_the_one_sampled(
    tmp_path, database_url, store, sshd, fake_vast, vast_client
):  # type: ignore[no-untyped-def]
    """A machine registered under a number (its snapshots' instance_id) is taken for that vast.ai instance
    by the policy (`vast_instance_assumed`). The idle rule samples the machine's own SSH endpoint, but
    `pause` stopped vast.ai instance <number> without asking whether that is the host sampled: an idle
    plain host could stop a busy rented one. Hibernate checks its endpoint against vast.ai; now an idle
    pause does too (`idle_action_skipped` with `endpoint_mismatch`)."""
    import datetime as dt

    from src.app import create_app
    from src.jobs.scheduler import tick
    from src.models import Job, MachineEvent, utcnow
    from tests.e2e.test_policies import Gpus, host_python
    from tests.support.fixtures_app import make_settings

    gpus = Gpus(tmp_path / "gpus")
    gpus.read(0)
    app = create_app(
        make_settings(
            tmp_path,
            database_url,
            ssh_key_path=sshd.client_key_path,
            ssh_user=sshd.user,
            remote_python=host_python(tmp_path, gpus),
            vast_api_key=fake_vast.api_key,
        ),
        object_store=store,
        vast=vast_client,
        configure_logs=False,
    )
    c = app.extensions["gpusnap"]
    fake_vast.set_ssh_endpoint("127.0.0.1", 2)  # vast.ai's instance is elsewhere, not the sampled sshd
    instance_id = vast_client.create_instance(1001, image="img", disk_gb=10, label="someone-elses-run")
    while not vast_client.show_instance(instance_id).is_running:
        time.sleep(0.05)
    with transaction(c.session_factory) as s:
        s.add(
            Machine(
                id=str(instance_id),
                status="running",
                ssh_host=sshd.host,
                ssh_port=sshd.port,
                ssh_user=sshd.user,
                workspace_path="/workspace",
            )
        )
    r = app.test_client().put(
        f"/api/instances/{instance_id}/policy",
        headers=AUTH,
        json={
            "idle": {
                "gpu_util_below": 5,
                "for_s": 2,
                "sample_every_s": 1,
                "action": "pause",
                "respect_ssh_sessions": False,
            }
        },
    )
    assert r.status_code == 200, r.get_json()
    now, actions = utcnow(), []
    for _ in range(5):
        now += dt.timedelta(seconds=1)
        actions += tick(c, now=now)["actions"]
    assert actions and all("job_id" not in a for a in actions), actions
    assert actions[0]["error"] == "endpoint_mismatch"
    with transaction(c.session_factory) as s:
        assert s.query(Job).filter_by(kind="pause").count() == 0
        assert s.get(Machine, str(instance_id)).status == "running"
        assert s.query(MachineEvent).filter_by(machine_id=str(instance_id), kind="idle_action_skipped").count()
    assert vast_client.show_instance(instance_id).is_running
    c.engine.dispose()
