"""One function per scenario; each runs trials against the World and returns what it saw.

A trial's `data_ok` is the no-data-loss goal for that trial: a finished restore is identical to the
source tree, a restore that did not finish left the live workspace exactly as it was (its root's
attributes too, on a mount point), a snapshot never changes its source, and a snapshot that did not
finish left nothing in the bucket (checked after the processes settle).
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.faults.world import World
from tests.support.trees import describe_tree


@dataclass
class Trial:
    scenario: str
    op: str
    outcome: str  # succeeded | failed:<code> | cancelled | stuck
    expected: bool  # the outcome is one this scenario allows
    data_ok: bool
    orphans: int
    seconds: float
    note: str = ""
    damage: str = ""  # '' | 'changed' (a failed restore swapped in the whole snapshot) | 'lost'


def _outcome(job: dict[str, Any]) -> str:
    if job["status"] == "failed":
        return "failed:" + ((job.get("error") or {}).get("code") or "?")
    return job["status"]


def _root(path: pathlib.Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def _snapshot(
    w: World, scenario: str, ws: pathlib.Path, *, during: Callable[[str], str] | None = None
) -> tuple[Trial, dict[str, Any] | None]:
    """Create a snapshot of `ws` (optionally doing `during(job_id)` while it runs); the trial and, when
    it succeeded, the snapshot."""
    source = describe_tree(ws)
    started = time.monotonic()
    created = w.create_snapshot(w.name("m"), ws)
    job_id = created["job"]["id"]
    injected = during(job_id) if during is not None else ""
    job = w.wait(job_id)
    outcome = _outcome(job)
    data_ok = describe_tree(ws) == source
    note = f"tries={job.get('remote_tries') or 1} {injected}".rstrip()
    if job["status"] in ("failed", "cancelled"):
        prefix = created["snapshot"]["storage_prefix"]
        deadline = time.monotonic() + 20
        while w.keys(prefix) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = len(w.keys(prefix))
        note += f" objects_left={left}"
    trial = Trial(
        scenario,
        "snapshot",
        outcome,
        job["status"] == "succeeded",
        data_ok,
        w.orphans(),
        time.monotonic() - started,
        note,
    )
    return trial, (created["snapshot"] if job["status"] == "succeeded" else None)


def _restore(
    w: World,
    scenario: str,
    snap: dict[str, Any],
    source: pathlib.Path,
    target: pathlib.Path | None = None,
    *,
    during: Callable[[str], str] | None = None,
) -> Trial:
    target = target or w.old_workspace(w.name("target"))
    before, root_before = describe_tree(target), _root(target)
    started = time.monotonic()
    job_id = w.restore(snap["id"], w.name("r"), target)["id"]
    injected = during(job_id) if during is not None else ""
    job = w.wait(job_id)
    outcome, damage = _outcome(job), ""
    if job["status"] == "succeeded":
        damage = "" if describe_tree(target) == describe_tree(source) else "lost"
    else:
        w.orphans()  # let a remote script that outlived its job do its worst before looking
        after = describe_tree(target)
        if after == before and _root(target) == root_before:
            damage = ""
        elif after == describe_tree(source):
            # whole and verified, but the job said it failed: allowed only when it said it cannot know
            damage = "" if outcome == "failed:remote_state_unknown" else "changed"
        else:
            damage = "lost"
    return Trial(
        scenario,
        "restore",
        outcome,
        job["status"] == "succeeded",
        not damage,
        w.orphans(),
        time.monotonic() - started,
        f"tries={job.get('remote_tries') or 1} {injected}".rstrip(),
        damage,
    )


def s3_faults(w: World, trials: int, rate: float) -> list[Trial]:
    name = f"s3-{int(rate * 100)}%"
    out: list[Trial] = []
    for _ in range(trials):
        ws = w.workspace(w.name("ws"))
        w.proxy.rate = rate
        try:
            trial, snap = _snapshot(w, name, ws)
            out.append(trial)
            if snap is not None:
                out.append(_restore(w, name, snap, ws))
        finally:
            w.proxy.rate = 0
    return out


def _mid_transfer(w: World, job_id: str, phase: str, parts: int = 2) -> str:
    """Wait until the job is `parts` parts into `phase`; '' then, or a note saying the moment was missed."""
    job = w.wait_for(job_id, lambda j: j["phase"] == phase and (j["progress"]["parts_done"] or 0) >= parts)
    if job["status"] != "running":
        return f"(fault missed: job already {job['status']})"
    return f"at={job['phase']}:{job['progress']['parts_done']}/{job['progress']['parts_total']}"


def kill9(w: World) -> list[Trial]:
    """kill -9 of the worker (its whole process group) in the middle of each job kind, then a new worker."""
    out: list[Trial] = []
    ws = w.workspace(w.name("ws"), random_mb=16)

    def kill_mid(phase: str) -> Callable[[str], str]:
        def act(job_id: str) -> str:
            where = _mid_transfer(w, job_id, phase)
            w.restart_worker_after_kill()
            return where

        return act

    trial, snap = _snapshot(w, "kill-9", ws, during=kill_mid("upload"))
    trial.op = "create_snapshot"
    out.append(trial)
    if snap is None:
        return out
    trial = _restore(w, "kill-9", snap, ws, during=kill_mid("download"))
    trial.op = "restore_snapshot"
    out.append(trial)

    for op, call in (
        ("verify_snapshot", lambda: w.stack.post(f"/api/gpu-snapshots/{snap['id']}/verify", json={"deep": True})),
        ("delete_snapshot", lambda: w.stack.delete(f"/api/gpu-snapshots/{snap['id']}")),
    ):
        started = time.monotonic()
        job_id = call().json()["job"]["id"]
        w.wait_for(job_id, lambda j: j["status"] == "running")
        w.restart_worker_after_kill()
        job = w.wait(job_id)
        data_ok = op != "delete_snapshot" or w.keys(snap["storage_prefix"]) == []
        out.append(
            Trial(
                "kill-9",
                op,
                _outcome(job),
                job["status"] == "succeeded",
                data_ok,
                w.orphans(),
                time.monotonic() - started,
            )
        )

    # hibernate and wake of a vast.ai instance whose SSH endpoint is the (relayed) loopback sshd
    box = w.vast_client.create_instance(1001, image="pytorch/pytorch:latest", disk_gb=50, label="faults-box")
    while not w.vast_client.show_instance(box).is_running:
        time.sleep(0.05)
    hws = w.workspace(w.name("hws"), random_mb=16)
    source = describe_tree(hws)
    started = time.monotonic()
    r = w.stack.post(f"/api/instances/{box}/hibernate", json={"workspace_path": str(hws)})
    job_id = r.json()["job"]["id"]
    where = _mid_transfer(w, job_id, "upload")
    w.restart_worker_after_kill()
    job = w.wait(job_id)
    destroyed = box not in [i["id"] for i in w.vast.live_instances()]
    ok = job["status"] == "succeeded" and destroyed
    out.append(
        Trial(
            "kill-9",
            "hibernate",
            _outcome(job),
            ok,
            describe_tree(hws) == source,
            w.orphans(),
            time.monotonic() - started,
            f"destroyed={destroyed} {where}",
        )
    )
    if not ok:
        return out
    shutil.rmtree(hws)  # the instance's disk went with it
    started = time.monotonic()
    r = w.stack.post(f"/api/instances/{box}/wake", json={"gpu_type": "RTX 4090"})
    job_id = r.json()["job"]["id"]
    where = _mid_transfer(w, job_id, "download", parts=1)
    w.restart_worker_after_kill()
    job = w.wait(job_id)
    data_ok = job["status"] != "succeeded" or (hws.exists() and describe_tree(hws) == source)
    out.append(
        Trial(
            "kill-9",
            "wake",
            _outcome(job),
            job["status"] == "succeeded",
            data_ok,
            w.orphans(),
            time.monotonic() - started,
            f"leaked_instances={w.leaked_instances()} {where}",
        )
    )
    return out


def ssh_resets(w: World) -> list[Trial]:
    """Every live SSH connection reset (RST) mid-upload, then mid-download."""
    ws = w.workspace(w.name("ws"), random_mb=16)

    def reset(phase: str) -> Callable[[str], str]:
        def act(job_id: str) -> str:
            where = _mid_transfer(w, job_id, phase)
            return f"{where} reset={w.relay.reset_all()}"

        return act

    trial, snap = _snapshot(w, "ssh-reset", ws, during=reset("upload"))
    out = [trial]
    if snap is not None:
        out.append(_restore(w, "ssh-reset", snap, ws, during=reset("download")))
    return out


def ssh_blackholes(w: World) -> list[Trial]:
    """The SSH link goes silent mid-transfer (packets swallowed, no RST) until the job has ended."""
    ws = w.workspace(w.name("ws"), random_mb=16)
    allowed = ("failed:remote_timeout", "failed:remote_state_unknown", "failed:ssh_connection_lost", "succeeded")

    def hole(phase: str) -> Callable[[str], str]:
        def act(job_id: str) -> str:
            where = _mid_transfer(w, job_id, phase)
            w.relay.blackhole = True
            w.wait(job_id)
            w.relay.blackhole = False
            w.relay.reset_all()
            return where

        return act

    trial, _ = _snapshot(w, "ssh-blackhole", ws, during=hole("upload"))
    trial.expected = trial.outcome in allowed
    out = [trial]
    snap_trial, snap = _snapshot(w, "ssh-blackhole", ws)  # a clean snapshot to restore from
    if snap is None:
        return out + [snap_trial]
    trial = _restore(w, "ssh-blackhole", snap, ws, during=hole("download"))
    trial.expected = trial.outcome in allowed
    return out + [trial]


def disk_full(w: World) -> list[Trial]:
    """Restores onto filesystems that cannot hold the snapshot: too few bytes (refused before download)
    and too few inodes (ENOSPC during extraction), the workspace being the mount point itself."""
    ws = w.workspace(w.name("ws"))
    trial, snap = _snapshot(w, "disk-full", ws)
    if snap is None:
        return [trial]
    out = []
    for label, options, codes in (
        ("bytes", "size=512k", ("failed:insufficient_disk",)),
        ("inodes", "size=64m,nr_inodes=12", ("failed:disk_full", "failed:tar_failed")),
    ):
        mount = w.mount_tmpfs(w.name("vol"), options)
        if mount is None:
            out.append(Trial("disk-full", "restore", "skipped", True, True, 0, 0.0, "cannot mount tmpfs here"))
            continue
        (mount / "old.txt").write_text("the live workspace")
        os.utime(mount, ns=(10**18, 10**18))
        trial = _restore(w, "disk-full", snap, ws, target=mount)
        trial.expected, trial.note = trial.outcome in codes, f"{label} {trial.note}"
        out.append(trial)
    return out


def random_cancels(w: World, trials: int, rng: random.Random) -> list[Trial]:
    """Cancel a snapshot or a restore after a random delay: it ends cancelled (nothing left behind) or, if
    the cancel came too late, succeeded; never half done."""
    out: list[Trial] = []
    ws = w.workspace(w.name("ws"), random_mb=8)
    _, snap = _snapshot(w, "cancel", ws)
    for i in range(trials):
        delay = rng.uniform(0.0, 4.0)

        def cancel(job_id: str) -> str:
            time.sleep(delay)
            return f"cancel={w.stack.post(f'/api/jobs/{job_id}/cancel').status_code}"

        if i % 2 == 0 or snap is None:
            trial, _ = _snapshot(w, "cancel", ws, during=cancel)
            trial.data_ok = trial.data_ok and ("objects_left=" not in trial.note or "objects_left=0" in trial.note)
        else:
            trial = _restore(w, "cancel", snap, ws, during=cancel)
        trial.expected = trial.outcome in ("cancelled", "succeeded")
        trial.note += f" after={delay:.1f}s"
        out.append(trial)
    return out
