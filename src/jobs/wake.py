"""The `wake` job: rent a vast.ai instance that fits, wait until it runs and answers SSH, restore the
snapshot onto it, and hand the machine back running under its old id.

Never leaks an instance: every rental is labelled `gpusnap:<machine>:<job>:<n>` before it is asked for,
so when anything fails after a rental was attempted (an error, a cancel, a crash and re-run) every
instance carrying this job's label prefix is destroyed and that destruction is confirmed."""
from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from src.errors import ExternalError, JobFailed
from src.jobs.context import JobContext, JobLost
from src.jobs.failpoints import failpoint
from src.jobs.kinds import JobKind
from src.jobs.remote import Endpoint
from src.jobs.rows import set_machine, snapshot_fields
from src.jobs.transfer_jobs import restore_onto
from src.jobs.vast_steps import destroy_confirmed, wait_running
from src.models import Job, Machine
from src.services.machines import add_event

NOT_READY = ("instance_not_ready", "instance_gone")


def required_disk_gb(raw_bytes: int, *, headroom: float, image_gb: float) -> int:
    """Disk to rent for a workspace of `raw_bytes`: the workspace with headroom, plus the image."""
    return int(math.ceil(raw_bytes * headroom / 1e9 + image_gb))


def wake(ctx: JobContext) -> dict[str, Any]:
    machine_id = ctx.machine_id
    assert machine_id is not None
    p = ctx.params
    vast = ctx.container.vast()
    snap = snapshot_fields(ctx, p["snapshot_id"])
    label_prefix = f"gpusnap:{machine_id}:{ctx.job_id}:"
    _destroy_labelled(ctx, vast, label_prefix)  # a re-run after a crash starts clean
    try:
        instance, offer = _rent_until_running(ctx, vast, label_prefix, disk_gb=p["disk_gb"])
        ep = instance.ssh_endpoint
        ctx.container.ssh_policy().check(ep.host)
        set_machine(ctx, machine_id, ssh_host=ep.host, ssh_port=ep.port, host_key=None,
                    event=("instance_ready", f"instance {instance.id} running at {ep.host}:{ep.port}"))
        failpoint("wake.before_restore")
        user = p.get("ssh_user") or ctx.settings.ssh_user
        endpoint = Endpoint(machine_id=machine_id, host=ep.host, port=ep.port, user=user, host_key=None)
        # overwrite: the instance was rented by this job a moment ago, so whatever is at the path came
        # from the image, not from a user (and it is kept beside the workspace all the same).
        restored = restore_onto(ctx, snap, endpoint, p["workspace_path"], overwrite=True)
    except JobLost:
        raise  # another worker owns this job now, and with it the instance
    except BaseException:
        ctx.progress(phase="cleanup")
        _destroy_labelled(ctx, vast, label_prefix)
        raise
    set_machine(ctx, machine_id, status="running", vast_instance_id=instance.id, gpu_name=instance.gpu_name,
                offer={"offer_id": offer.id, "dph_total": offer.dph_total, "disk_gb": p["disk_gb"],
                       "image": p["image"], "geolocation": offer.geolocation},
                event=("woke", f"restored {snap['id']} onto vast.ai instance {instance.id}"))
    return {"instance_id": instance.id, "offer_id": offer.id, "dph_total": offer.dph_total,
            "ssh_host": ep.host, "ssh_port": ep.port, **restored}


def _rent_until_running(ctx: JobContext, vast: Any, label_prefix: str, *, disk_gb: int) -> tuple[Any, Any]:
    """Rent the cheapest fitting offer and wait for it to run; when a host never becomes ready, destroy
    it and try the next offer (at most VAST_MAX_OFFERS). Raises JobFailed(`no_offer`) when nothing fits."""
    p = ctx.params
    ctx.progress(phase="search_offers")
    offers = vast.search_offers(gpu_name=p.get("gpu_type"), num_gpus=p.get("num_gpus", 1), region=p.get("region"),
                                max_price_per_hour=p.get("max_price"), min_disk_gb=disk_gb)
    if not offers:
        wanted = ", ".join(f"{k}={p[k]}" for k in ("gpu_type", "num_gpus", "region", "max_price") if p.get(k))
        raise JobFailed(f"no vast.ai offer fits ({wanted or 'any GPU'}, disk >= {disk_gb} GB); nothing was rented",
                        code="no_offer")
    failures: list[str] = []
    for n, offer in enumerate(offers[: ctx.settings.vast_max_offers]):
        ctx.check_cancelled()
        label = f"{label_prefix}{n}"
        ctx.progress(phase="rent")
        ctx.save_state(renting=label)
        try:
            # ssh_direct: SSH straight to the host (no shared relay in the way of a long restore).
            instance_id = vast.create_instance(offer.id, image=p["image"], disk_gb=disk_gb, label=label,
                                               runtype="ssh_direct")
        except ExternalError as e:
            # The contract may exist anyway (vast.ai answered badly after acting): remove what carries the label.
            _destroy_labelled(ctx, vast, label)
            failures.append(f"offer {offer.id}: {e.message}")
            if not e.retryable and e.code == "vast_auth_failed":
                raise
            continue
        ctx.save_state(instance_id=instance_id)
        set_machine(ctx, ctx.machine_id or "", event=("instance_rented", f"offer {offer.id} rented as instance "
                                                      f"{instance_id} at ${offer.dph_total}/h"))
        ctx.progress(phase="wait_running")
        try:
            return wait_running(ctx, vast, instance_id, deadline_s=ctx.settings.vast_ready_deadline_s), offer
        except JobFailed as e:
            if e.code not in NOT_READY:
                raise
            failures.append(f"offer {offer.id} (instance {instance_id}): {e.message}")
            ctx.progress(phase="cleanup")
            destroy_confirmed(ctx, vast, instance_id)
            set_machine(ctx, ctx.machine_id or "", event=("instance_abandoned", e.message))
    raise JobFailed("no rented instance became ready: " + "; ".join(failures), code="no_ready_offer")


def _destroy_labelled(ctx: JobContext, vast: Any, label_prefix: str) -> None:
    """Destroy (confirmed) every instance whose label starts with `label_prefix`."""
    for instance in vast.list_instances(label_prefix=label_prefix):
        destroy_confirmed(ctx, vast, instance.id)


def _wake_ended(s: Session, job: Job) -> None:
    """A wake that did not finish leaves the machine hibernated (its snapshot is untouched)."""
    if job.status == "succeeded" or job.machine_id is None:
        return
    machine = s.get(Machine, job.machine_id)
    if machine is None:
        return
    machine.status = "hibernated"
    machine.vast_instance_id, machine.ssh_host, machine.ssh_port, machine.host_key = None, None, None, None
    if job.error_code == "destroy_unconfirmed":
        machine.status = "error"
    add_event(s, machine.id, "wake_failed", f"{job.error_code}: {job.error_message}", job_id=job.id)


KIND = JobKind("wake", wake, rerunnable=True, on_end=_wake_ended)
