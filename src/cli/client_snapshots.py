"""`gpusnap snapshots ...`: list, show, create, restore, verify and delete workspace snapshots."""

from __future__ import annotations

from typing import Any

import click

from src.cli import render
from src.cli.common import (
    CODECS,
    CliFailure,
    api_command,
    echo_json,
    given,
    idempotency_option,
    job_command,
    json_option,
    list_all,
    page_options,
    show_list,
    show_one,
    submitted,
    wait_options,
)
from src.cli.http import ApiClient, seg

SNAPSHOT_STATUSES = ("pending", "running", "complete", "failed", "deleting")

host_option = click.option("--host", "ssh_host", required=True, help="SSH host of the GPU machine.")
port_option = click.option("--port", "ssh_port", type=click.IntRange(1, 65535), required=True, help="SSH port.")
user_option = click.option("--user", "ssh_user", default=None, help="SSH login (default: the server's SSH_USER).")
workspace_option = click.option(
    "--workspace", "workspace_path", required=True, help="Absolute path of the workspace on the GPU machine."
)


def _new_snapshot(answer: dict[str, Any]) -> str:
    snap = answer["snapshot"]
    return f"snapshot {snap['id']} ({snap['status']}) of instance {snap['instance_id']}"


@click.group()
def snapshots() -> None:
    """Workspace snapshots stored in the bucket."""


@snapshots.command("ls")
@click.option("--instance", "instance_id", default=None, help="Only snapshots of this machine.")
@click.option("--status", type=click.Choice(SNAPSHOT_STATUSES), default=None, help="Only snapshots in this status.")
@page_options
@json_option
@api_command
def snapshots_ls(
    api: ApiClient,
    instance_id: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
    all_pages: bool,
    as_json: bool,
) -> None:
    """List snapshots, newest first: sizes, compression ratio, parts."""
    params = {"instance_id": instance_id, "status": status, "limit": limit, "cursor": cursor}
    show_list(
        list_all(api, "/api/gpu-snapshots", params, follow_cursor=all_pages),
        render.snapshot_rows,
        noun="snapshots",
        as_json=as_json,
    )


@snapshots.command("show")
@click.argument("snapshot_id")
@json_option
@api_command
def snapshots_show(api: ApiClient, snapshot_id: str, as_json: bool) -> None:
    """Show one snapshot: status, sizes, ratio, codec, parts, phase durations."""
    show_one(api.get(f"/api/gpu-snapshots/{seg(snapshot_id)}"), render.snapshot_detail, as_json=as_json)


@snapshots.command("create")
@click.option("--instance", "instance_id", required=True, help="Machine id the snapshot belongs to.")
@host_option
@port_option
@workspace_option
@user_option
@click.option("--name", "snapshot_name", default=None, help="A name to recognise it by.")
@click.option(
    "--codec",
    type=click.Choice(CODECS),
    default="auto",
    show_default=True,
    help="Compression: auto picks nvcomp-ans on a GPU host that has it, else zstd.",
)
@click.option("--exclude", "excludes", multiple=True, help="Glob to leave out (repeatable).")
@job_command(lead=_new_snapshot)
def snapshots_create(
    api: ApiClient,
    instance_id: str,
    ssh_host: str,
    ssh_port: int,
    workspace_path: str,
    ssh_user: str | None,
    snapshot_name: str | None,
    codec: str,
    excludes: tuple[str, ...],
    idempotency_key: str | None,
) -> dict[str, Any]:
    """Snapshot a workspace over SSH into the bucket (a job; --wait follows it)."""
    body = {
        "instance_id": instance_id,
        "ssh_host": ssh_host,
        "ssh_port": ssh_port,
        "workspace_path": workspace_path,
        "codec": codec,
        "excludes": list(excludes),
        **given(ssh_user=ssh_user, snapshot_name=snapshot_name),
    }
    return api.post("/api/gpu-snapshots", body, idempotency_key=idempotency_key)


@snapshots.command("restore")
@click.argument("snapshot_id")
@click.option(
    "--host",
    "ssh_hosts",
    required=True,
    multiple=True,
    help="SSH host of the GPU machine, HOST or HOST:PORT; repeat it to restore onto several hosts at "
    "once (one job each, run concurrently).",
)
@click.option(
    "--port",
    "ssh_port",
    type=click.IntRange(1, 65535),
    default=None,
    help="SSH port (for every --host given without one).",
)
@workspace_option
@user_option
@click.option("--instance", "instance_id", default=None, help="Machine the host now belongs to (one --host only).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a non-empty workspace (kept beside it as "
    "<path>.gpusnap-old-<timestamp> until the next restore there).",
)
@click.option("--keep-setuid", is_flag=True, default=False, help="Restore setuid/setgid bits (cleared by default).")
@idempotency_option
@wait_options
@json_option
@api_command
def snapshots_restore(
    api: ApiClient,
    snapshot_id: str,
    ssh_hosts: tuple[str, ...],
    ssh_port: int | None,
    workspace_path: str,
    ssh_user: str | None,
    instance_id: str | None,
    overwrite: bool,
    keep_setuid: bool,
    idempotency_key: str | None,
    wait: bool,
    timeout: float | None,
    interval: float,
    as_json: bool,
) -> None:
    """Restore a snapshot onto a host over SSH (or onto several: one job per host, run at once). Every
    part is verified and the archive fully extracted beside the workspace before the live workspace is
    replaced. Without --overwrite a non-empty workspace fails the job with workspace_exists."""
    targets = [_endpoint(h, ssh_port) for h in ssh_hosts]
    if instance_id and len(targets) > 1:
        raise click.UsageError("--instance names one machine: give one --host with it")
    answers = []
    for host, port in targets:
        body = {
            "ssh_host": host,
            "ssh_port": port,
            "workspace_path": workspace_path,
            **given(
                ssh_user=ssh_user, instance_id=instance_id, overwrite=overwrite or None, keep_setuid=keep_setuid or None
            ),
        }
        # One key per target: a retry of the whole command gets the same jobs back, not one job for all.
        key = idempotency_key if len(targets) == 1 or not idempotency_key else f"{idempotency_key}:{host}:{port}"
        answers.append(api.post(f"/api/gpu-snapshots/{seg(snapshot_id)}/restore", body, idempotency_key=key))
    if len(answers) == 1:
        submitted(api, answers[0], as_json=as_json, wait=wait, timeout=timeout, interval=interval)
        return
    if as_json and not wait:
        echo_json({"jobs": [a["job"] for a in answers]})
        return
    failures = []
    for answer in answers:
        try:
            submitted(api, answer, as_json=as_json, wait=wait, timeout=timeout, interval=interval)
        except CliFailure as e:  # follow the other restores to their end before reporting
            e.show()
            failures.append(e)
    if failures:
        raise CliFailure(
            failures[0].code,
            f"{len(failures)} of {len(answers)} restores did not succeed",
            exit_code=max(f.exit_code for f in failures),
        )


def _endpoint(text: str, default_port: int | None) -> tuple[str, int]:
    """HOST or HOST:PORT (a bare IPv6 address has several colons and takes --port)."""
    host, port = text, default_port
    if text.count(":") == 1:
        host, _, raw = text.partition(":")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 65535):
            raise click.BadParameter(f"{text!r}: the port must be 1-65535", param_hint="--host")
        port = int(raw)
    if port is None:
        raise click.BadParameter(f"{text!r} has no port: give HOST:PORT or --port", param_hint="--host")
    return host, port


@snapshots.command("verify")
@click.argument("snapshot_id")
@click.option("--deep", is_flag=True, help="Re-read every part and check its SHA-256, not only its size.")
@job_command()
def snapshots_verify(api: ApiClient, snapshot_id: str, deep: bool, idempotency_key: str | None) -> dict[str, Any]:
    """Check that a snapshot's manifest and parts are in the bucket, intact."""
    return api.post(f"/api/gpu-snapshots/{seg(snapshot_id)}/verify", {"deep": deep}, idempotency_key=idempotency_key)


@snapshots.command("rm")
@click.argument("snapshot_id")
@click.option("--force", is_flag=True, help="Delete even the snapshot a hibernated machine would wake from.")
@job_command()
def snapshots_rm(api: ApiClient, snapshot_id: str, force: bool, idempotency_key: str | None) -> dict[str, Any]:
    """Delete a snapshot: its objects (manifest first), then its record. The snapshot a hibernated machine
    would wake from is refused (snapshot_needed) unless --force."""
    query = "?force=true" if force else ""
    return api.delete(f"/api/gpu-snapshots/{seg(snapshot_id)}{query}", idempotency_key=idempotency_key)
