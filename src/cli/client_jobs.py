"""`gpusnap jobs ls|show|wait|cancel` and `gpusnap gc`."""

from __future__ import annotations

from typing import Any

import click

from src.cli import render
from src.cli.common import (
    api_command,
    echo_json,
    follow,
    job_command,
    json_option,
    list_all,
    page_options,
    show_list,
    show_one,
)
from src.cli.http import ApiClient, seg

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


@click.group()
def jobs() -> None:
    """Jobs: follow, list, cancel the long operations."""


@jobs.command("ls")
@click.option("--kind", default=None, help="Only jobs of this kind (create_snapshot, restore_snapshot, ...).")
@click.option("--status", type=click.Choice(JOB_STATUSES), default=None, help="Only jobs in this status.")
@click.option("--instance", "instance_id", default=None, help="Only jobs on this machine.")
@page_options
@json_option
@api_command
def jobs_ls(
    api: ApiClient,
    kind: str | None,
    status: str | None,
    instance_id: str | None,
    limit: int,
    cursor: str | None,
    all_pages: bool,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    params = {"kind": kind, "status": status, "instance_id": instance_id, "limit": limit, "cursor": cursor}
    show_list(
        list_all(api, "/api/jobs", params, follow_cursor=all_pages), render.job_rows, noun="jobs", as_json=as_json
    )


@jobs.command("show")
@click.argument("job_id")
@json_option
@api_command
def jobs_show(api: ApiClient, job_id: str, as_json: bool) -> None:
    """Show one job: status, phase, progress, error, result."""
    show_one(api.get(f"/api/jobs/{seg(job_id)}"), render.job_detail, as_json=as_json)


@jobs.command("wait")
@click.argument("job_id")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Give up (exit 2) after this many seconds; the job goes on.",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, help="Seconds between polls."
)
@json_option
@api_command
def jobs_wait(api: ApiClient, job_id: str, timeout: float | None, interval: float, as_json: bool) -> None:
    """Follow a job to its end with a progress bar on stderr (plain lines when stderr is not a terminal).

    Exits 0 when the job succeeded, 1 when it failed or was cancelled, 2 when --timeout ran out."""
    follow(api, job_id, timeout=timeout, interval=interval, as_json=as_json)


@jobs.command("cancel")
@click.argument("job_id")
@json_option
@api_command
def jobs_cancel(api: ApiClient, job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one at once, a running one at its next heartbeat (remote work included)."""
    job = api.post(f"/api/jobs/{seg(job_id)}/cancel")
    if as_json:
        echo_json(job)
    elif job["status"] in ("queued", "running"):
        click.echo(f"cancel requested: {render.job_summary(job)}")
    else:
        click.echo(render.job_summary(job))


# ---- maintenance ---------------------------------------------------------------------------------


@click.command("gc")
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Delete only unreferenced objects at least this many seconds old (default: the server's GC_GRACE_S).",
)
@job_command()
def gc(api: ApiClient, grace_s: float | None, idempotency_key: str | None) -> dict[str, Any]:
    """Garbage-collect the chunk stores: delete chunks and packs no snapshot references (format 2), and
    repack packs that are mostly garbage. Machines with a snapshot in progress are skipped."""
    body = {} if grace_s is None else {"grace_s": grace_s}
    return api.post("/api/maintenance/gc", body, idempotency_key=idempotency_key)
