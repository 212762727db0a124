"""The `wake` job: rent a vast.ai instance that fits, wait until it runs and answers SSH, restore the
snapshot onto it, and hand the machine back running under its old id.

Never leaks an instance, and never touches another attempt's: every rental is labelled
`gpusnap:<machine hash>:<job>:<attempt>:<n>` (`rental_label`) before it is asked for. When anything fails
after a rental was attempted (an error, a cancel), this attempt destroys, confirmed, what carries its own
attempt's label. A re-run after a crash (a new attempt) first destroys what earlier attempts of the job
rented, and sweeps again before it hands the machine over. Every vast.ai action and row write checks
that this attempt still owns the job, so a worker frozen past its lease that wakes up does nothing.
The hand-over (the machine row pointing at the new instance) is the point of no return: a cancel
accepted before it destroys the new instance; after it, a cancel is refused (`too_late_to_cancel`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
from typing import Any

from sqlalchemy.orm import Session

from src.errors import ExternalError, JobCancelled, JobFailed
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
# vast.ai is reported to refuse long instance labels (no public document states the limit: the
# label-instance reference, docs.vast.ai/cli/reference/label-instance, only says "string"); stay within 64.
LABEL_MAX = 64

logger = logging.getLogger(__name__)


def job_label_prefix(machine_id: str, job_id: str) -> str:
    """What every rental of one wake job carries. The machine id (up to 128 characters, any printable
    character) enters as a short hash; the job id leads back to the machine through the database."""
    return f"gpusnap:{hashlib.sha256(machine_id.encode()).hexdigest()[:12]}:{job_id}:"


def rental_label(machine_id: str, job_id: str, attempt: int, n: int) -> str:
    """The label of the `n`-th rental of `attempt` of a wake job (at most LABEL_MAX characters)."""
    label = f"{job_label_prefix(machine_id, job_id)}{attempt}:{n}"
    if len(label) > LABEL_MAX:
        raise JobFailed(f"rental label {label!r} is longer than {LABEL_MAX} characters", code="internal")
    return label


def _label_attempt(label: str | None, prefix: str) -> int | None:
    """The attempt number in a label made by `rental_label` under `prefix`, else None."""
    rest = (label or "").removeprefix(prefix)
    head = rest.split(":", 1)[0]
    return int(head) if label and label.startswith(prefix) and head.isdigit() else None


def required_disk_gb(raw_bytes: int, *, headroom: float, image_gb: float) -> int:
    """Disk to rent for a workspace of `raw_bytes`: the workspace with headroom, plus the image."""
    return int(math.ceil(raw_bytes * headroom / 1e9 + image_gb))


def wake(ctx: JobContext) -> dict[str, Any]:
    machine_id = ctx.machine_id
    assert machine_id is not None
    p = ctx.params
    if "woke" in ctx.state:  # an earlier attempt handed the machine over, then its worker died
        return dict(ctx.state["woke"])
    vast = ctx.container.vast()
    job_prefix = job_label_prefix(machine_id, ctx.job_id)
    if ctx.state.get("abandoned"):  # recovery's last run: undo what the dead attempts rented, then end
        ctx.progress(phase="cleanup")
        _destroy_labelled(ctx, vast, job_prefix)
        if ctx.state["abandoned"] == "cancelled":
            raise JobCancelled("the job was cancelled; the instances its attempts rented were destroyed")
        raise JobFailed(
            "the worker running this job stopped; the instances its attempts rented were destroyed", code="interrupted"
        )
    snap = snapshot_fields(ctx, p["snapshot_id"])
    _destroy_other_attempts(ctx, vast, job_prefix)  # a re-run after a crash starts clean
    own_prefix = f"{job_prefix}{ctx.attempt}:"
    started = time.monotonic()
    try:
        instance, offer = _rent_until_running(ctx, vast, machine_id, disk_gb=p["disk_gb"])
        running = time.monotonic()
        ep = instance.ssh_endpoint
        ctx.container.ssh_policy().check(ep.host)
        set_machine(
            ctx,
            machine_id,
            ssh_host=ep.host,
            ssh_port=ep.port,
            host_key=None,
            event=("instance_ready", f"instance {instance.id} running at {ep.host}:{ep.port}"),
        )
        failpoint("wake.before_restore")
        user = p.get("ssh_user") or ctx.settings.ssh_user
        endpoint = Endpoint(machine_id=machine_id, host=ep.host, port=ep.port, user=user, host_key=None)
        # overwrite: the instance was rented by this job a moment ago, so whatever is at the path came
        # from the image, not from a user (and it is kept beside the workspace all the same).
        restored = restore_onto(ctx, snap, endpoint, p["workspace_path"], overwrite=True)
        # Per phase, for the /metrics wake-time histograms (src/services/policy_metrics.py).
        timings = {
            "queue_s": _queue_s(ctx.state),
            "rent_s": round(running - started, 3),
            "restore_s": round(time.monotonic() - running, 3),
        }
        ctx.check_cancelled()
        # An attempt frozen between its ownership check and its rent may have rented after our first sweep.
        _destroy_other_attempts(ctx, vast, job_prefix)
        result = {
            "instance_id": instance.id,
            "offer_id": offer.id,
            "dph_total": offer.dph_total,
            "ssh_host": ep.host,
            "ssh_port": ep.port,
            **restored,
            "timings": timings,
        }
        set_machine(
            ctx,
            machine_id,
            no_return="hand_over",
            save={"woke": result},
            status="running",
            vast_instance_id=instance.id,
            gpu_name=instance.gpu_name,
            offer={
                "offer_id": offer.id,
                "dph_total": offer.dph_total,
                "disk_gb": p["disk_gb"],
                "image": p["image"],
                "num_gpus": p.get("num_gpus"),
                "geolocation": offer.geolocation,
                # vast.ai's per-GB transfer prices, shown with the machine's costs when the offer has them
                "inet_up_cost": offer.raw.get("inet_up_cost"),
                "inet_down_cost": offer.raw.get("inet_down_cost"),
            },
            event=("woke", f"restored {snap['id']} onto vast.ai instance {instance.id}"),
        )
    except JobLost:
        # Another attempt owns the job now and may have finished already, so nobody else will sweep what
        # this one rented while it was frozen. Rentals with this attempt's own label are this attempt's
        # alone (a hand-over is a fenced write a lost attempt cannot make): destroy them, unfenced.
        for instance in vast.list_instances(label_prefix=own_prefix):
            if not instance.is_released:
                destroy_confirmed(ctx, vast, instance.id, fenced=False)
        raise
    except BaseException:
        ctx.progress(phase="cleanup")
        _destroy_labelled(ctx, vast, own_prefix)
        raise
    return result


def _queue_s(state: dict[str, Any]) -> float | None:
    """Seconds the job waited in the wake queue (src/services/wake_queue.py), when it did."""
    try:
        queued = dt.datetime.fromisoformat(str(state["wake_queued_at"]).replace("Z", "+00:00"))
        admitted = dt.datetime.fromisoformat(str(state["admitted_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return round(max(0.0, (admitted - queued).total_seconds()), 3)


def _rent_until_running(ctx: JobContext, vast: Any, machine_id: str, *, disk_gb: int) -> tuple[Any, Any]:
    """Rent the cheapest fitting offer and wait for it to run; when a host never becomes ready, destroy
    it and try the next offer (at most VAST_MAX_OFFERS). Raises JobFailed(`no_offer`) when nothing fits."""
    p = ctx.params
    ctx.progress(phase="search_offers")
    # min_direct_ports: we rent `ssh_direct`, which maps port 22 only on hosts that have direct ports.
    offers = vast.search_offers(
        gpu_name=p.get("gpu_type"),
        num_gpus=p.get("num_gpus", 1),
        region=p.get("region"),
        max_price_per_hour=p.get("max_price"),
        min_disk_gb=disk_gb,
        min_direct_ports=1,
        min_cuda=p.get("min_cuda"),
    )
    if not offers:
        wanted = ", ".join(
            f"{k}={p[k]}" for k in ("gpu_type", "num_gpus", "region", "max_price", "min_cuda") if p.get(k)
        )
        raise JobFailed(
            f"no vast.ai offer fits ({wanted or 'any GPU'}, disk >= {disk_gb} GB); nothing was rented", code="no_offer"
        )
    failures: list[str] = []
    for n, offer in enumerate(offers[: ctx.settings.vast_max_offers]):
        ctx.check_cancelled()
        label = rental_label(machine_id, ctx.job_id, ctx.attempt, n)
        ctx.progress(phase="rent")
        ctx.save_state(renting=label)  # a fenced write: raises JobLost, before renting, unless we own the job
        ctx.check_cancelled()  # and its answer says whether a cancel came meanwhile: then rent nothing
        try:
            # ssh_direct: SSH straight to the host (no shared relay in the way of a long restore).
            instance_id = vast.create_instance(
                offer.id, image=p["image"], disk_gb=disk_gb, label=label, runtype="ssh_direct"
            )
        except ExternalError as e:
            # The contract may exist anyway (vast.ai answered badly after acting): remove what carries the label.
            _destroy_labelled(ctx, vast, label)
            failures.append(f"offer {offer.id}: {e.message}")
            if not e.retryable and e.code == "vast_auth_failed":
                raise
            continue
        ctx.save_state(instance_id=instance_id)
        set_machine(
            ctx,
            ctx.machine_id or "",
            event=("instance_rented", f"offer {offer.id} rented as instance {instance_id} at ${offer.dph_total}/h"),
        )
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
    """Destroy (confirmed) every instance whose label starts with `label_prefix` (those already released,
    `unloaded`, are destroyed: vast.ai only still lists them)."""
    for instance in vast.list_instances(label_prefix=label_prefix):
        if not instance.is_released:
            destroy_confirmed(ctx, vast, instance.id)


def _destroy_other_attempts(ctx: JobContext, vast: Any, job_prefix: str) -> None:
    """Destroy (confirmed) what earlier attempts of this job rented; never this attempt's own rentals."""
    for instance in vast.list_instances(label_prefix=job_prefix):
        if _label_attempt(instance.label, job_prefix) != ctx.attempt and not instance.is_released:
            logger.warning(
                "destroying instance %s (%s) left by an earlier attempt of job %s",
                instance.id,
                instance.label,
                ctx.job_id,
            )
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


KIND = JobKind("wake", wake, rerunnable=True, on_end=_wake_ended, cleans_up=True)
