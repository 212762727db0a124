"""`gpusnap instances ...`: machines, which keep their id across hibernate and wake."""

from __future__ import annotations

from typing import Any

import click

from src.cli import render
from src.cli.client_policies import policy
from src.cli.common import (
    CODECS,
    api_command,
    given,
    job_command,
    json_option,
    list_all,
    page_options,
    show_list,
    show_one,
)
from src.cli.http import ApiClient, seg


@click.group()
def instances() -> None:
    """GPU machines: list, hibernate, wake, pause, resume."""


@instances.command("ls")
@click.option("--status", default=None, help="Only machines in this status (running, hibernated, paused, ...).")
@page_options
@json_option
@api_command
def instances_ls(
    api: ApiClient, status: str | None, limit: int, cursor: str | None, all_pages: bool, as_json: bool
) -> None:
    """List machines with their current host and last snapshot."""
    params = {"status": status, "limit": limit, "cursor": cursor}
    show_list(
        list_all(api, "/api/instances", params, follow_cursor=all_pages),
        render.machine_rows,
        noun="instances",
        as_json=as_json,
    )


@instances.command("show")
@click.argument("instance_id")
@json_option
@api_command
def instances_show(api: ApiClient, instance_id: str, as_json: bool) -> None:
    """Show one machine and its event history (by its own id or its current vast.ai instance id)."""
    show_one(api.get(f"/api/instances/{seg(instance_id)}"), render.machine_detail, as_json=as_json)


@instances.command("hibernate")
@click.argument("instance_id")
@click.option("--workspace", "workspace_path", required=True, help="Absolute path of the workspace to keep.")
@click.option("--host", "ssh_host", default=None, help="SSH host (default: the one the server knows).")
@click.option("--port", "ssh_port", type=click.IntRange(1, 65535), default=None, help="SSH port.")
@click.option("--user", "ssh_user", default=None, help="SSH login (default: the server's SSH_USER).")
@click.option("--keep-instance", is_flag=True, help="Snapshot only; do not destroy the instance afterwards.")
@click.option("--deep-verify", is_flag=True, help="Check every part's SHA-256 before destroying, not only sizes.")
@click.option("--codec", type=click.Choice(CODECS), default=None, help="Compression (default: auto).")
@click.option("--exclude", "excludes", multiple=True, help="Glob to leave out (repeatable).")
@job_command()
def instances_hibernate(
    api: ApiClient,
    instance_id: str,
    workspace_path: str,
    ssh_host: str | None,
    ssh_port: int | None,
    ssh_user: str | None,
    keep_instance: bool,
    deep_verify: bool,
    codec: str | None,
    excludes: tuple[str, ...],
    idempotency_key: str | None,
) -> dict[str, Any]:
    """Snapshot the workspace, verify it, then destroy the vast.ai instance (it stops billing).

    The instance is destroyed only once the snapshot is complete and verified."""
    body = given(
        workspace_path=workspace_path,
        ssh_host=ssh_host,
        ssh_port=ssh_port,
        ssh_user=ssh_user,
        codec=codec,
        excludes=list(excludes) or None,
        deep_verify=deep_verify or None,
    )
    body["destroy_after"] = not keep_instance
    return api.post(f"/api/instances/{seg(instance_id)}/hibernate", body, idempotency_key=idempotency_key)


@instances.command("wake")
@click.argument("instance_id")
@click.option("--snapshot", "snapshot_id", default=None, help="Snapshot to restore (default: the latest complete).")
@click.option("--gpu-type", default=None, help="GPU model to rent, e.g. 'RTX 4090'.")
@click.option("--num-gpus", type=click.IntRange(1, 16), default=None, help="GPUs to rent (default 1).")
@click.option("--region", default=None, help="Region to rent in, e.g. 'europe'.")
@click.option(
    "--max-price", type=click.FloatRange(min=0, min_open=True), default=None, help="Highest price in USD per hour."
)
@click.option("--disk-gb", type=click.IntRange(min=1), default=None, help="Disk to rent (default: fits the snapshot).")
@click.option("--image", default=None, help="Docker image for the new instance.")
@click.option("--workspace", "workspace_path", default=None, help="Restore here (default: where it was taken).")
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=None,
    help="Place in the wake queue while WAKE_CONCURRENCY wakes run: 9 first (default 5).",
)
@job_command()
def instances_wake(
    api: ApiClient,
    instance_id: str,
    snapshot_id: str | None,
    gpu_type: str | None,
    num_gpus: int | None,
    region: str | None,
    max_price: float | None,
    disk_gb: int | None,
    image: str | None,
    workspace_path: str | None,
    priority: int | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """Rent a new instance and restore the machine's snapshot onto it; the machine keeps its id."""
    body = given(
        snapshot_id=snapshot_id,
        gpu_type=gpu_type,
        num_gpus=num_gpus,
        region=region,
        max_price=max_price,
        disk_gb=disk_gb,
        image=image,
        workspace_path=workspace_path,
        priority=priority,
    )
    return api.post(f"/api/instances/{seg(instance_id)}/wake", body, idempotency_key=idempotency_key)


def _simple(action: str, doc: str) -> click.Command:
    """pause and resume: an empty POST that starts a job."""

    @job_command()
    def command(api: ApiClient, instance_id: str, idempotency_key: str | None) -> dict[str, Any]:
        return api.post(f"/api/instances/{seg(instance_id)}/{action}", idempotency_key=idempotency_key)

    return click.command(action, help=doc)(click.argument("instance_id")(command))


instances.add_command(policy)
instances.add_command(_simple("pause", "Stop the instance on vast.ai: its disk is kept (and billed), no data moves."))
instances.add_command(_simple("resume", "Start a paused instance again (fails if its GPUs were taken meanwhile)."))


@instances.command("forget-host-key")
@click.argument("instance_id")
@json_option
@api_command
def instances_forget_host_key(api: ApiClient, instance_id: str, as_json: bool) -> None:
    """Clear the machine's pinned SSH host key (after a re-install): the next connection pins the key
    the host presents. Recorded in the machine's history."""
    show_one(api.post(f"/api/instances/{seg(instance_id)}/forget-host-key"), render.machine_detail, as_json=as_json)
