"""`gpusnap instances policy set|show|rm`: what the worker does to a machine by itself."""

from __future__ import annotations

import json
from typing import Any

import click

from src.cli import render
from src.cli.common import CODECS, api_command, echo_json, json_option
from src.cli.http import ApiClient, seg


@click.group()
def policy() -> None:
    """A machine's policy: scheduled snapshots, retention, idle auto-hibernate."""


@policy.command("set")
@click.argument("instance_id")
@click.option("--workspace", "workspace_path", default=None, help="Workspace to snapshot (default: the machine's).")
@click.option("--exclude", "excludes", multiple=True, help="Glob to leave out (repeatable).")
@click.option("--codec", type=click.Choice(CODECS), default=None, help="Compression (default: auto).")
@click.option("--schedule", default=None, help="5-field cron expression in UTC, e.g. '0 3 * * *'.")
@click.option("--keep-last", type=click.IntRange(0), default=None, help="Keep the newest N complete snapshots.")
@click.option("--keep-daily", type=click.IntRange(0), default=None, help="Keep one a day for N days.")
@click.option("--keep-weekly", type=click.IntRange(0), default=None, help="Keep one a week for N weeks.")
@click.option("--keep-monthly", type=click.IntRange(0), default=None, help="Keep one a month for N months.")
@click.option(
    "--idle-below",
    type=click.IntRange(1, 100),
    default=None,
    help="Idle when every GPU reads below this percent for --idle-for (turns the idle rule on).",
)
@click.option("--idle-for", "for_s", type=click.IntRange(1), default=None, help="Idle window in seconds (1800).")
@click.option(
    "--sample-every", "sample_every_s", type=click.IntRange(1), default=None, help="Seconds between samples (60)."
)
@click.option(
    "--idle-action",
    type=click.Choice(("hibernate", "pause", "notify")),
    default=None,
    help="What to do once idle (hibernate).",
)
@click.option("--ignore-ssh-sessions", is_flag=True, help="Act even while someone is logged in over SSH.")
@click.option("--dry-run", is_flag=True, help="Only record what the idle action would do.")
@click.option(
    "--from-file",
    type=click.File("r"),
    default=None,
    help="The whole policy as JSON (the PUT body); the other options are then not allowed.",
)
@json_option
@api_command
def policy_set(api: ApiClient, instance_id: str, from_file: Any, as_json: bool, **options: Any) -> None:
    """Set (replace) the machine's policy. Every part is optional; the server checks it all."""
    if from_file is not None:
        if any(v not in (None, (), False) for v in options.values()):
            raise click.UsageError("--from-file replaces the other options; give one or the other")
        body = json.load(from_file)
    else:
        body = policy_body(**options)
    answer = api.put(f"/api/instances/{seg(instance_id)}/policy", body)
    echo_json(answer) if as_json else click.echo(render.policy_detail(answer))


def policy_body(
    *,
    workspace_path: str | None,
    excludes: tuple[str, ...],
    codec: str | None,
    schedule: str | None,
    keep_last: int | None,
    keep_daily: int | None,
    keep_weekly: int | None,
    keep_monthly: int | None,
    idle_below: int | None,
    for_s: int | None,
    sample_every_s: int | None,
    idle_action: str | None,
    ignore_ssh_sessions: bool,
    dry_run: bool,
) -> dict[str, Any]:
    """The PUT body from the options given (the server's defaults fill in the rest)."""
    body: dict[str, Any] = {
        k: v for k, v in (("workspace_path", workspace_path), ("codec", codec), ("schedule", schedule)) if v is not None
    }
    if excludes:
        body["excludes"] = list(excludes)
    keep = {
        k: v
        for k, v in (
            ("keep_last", keep_last),
            ("keep_daily", keep_daily),
            ("keep_weekly", keep_weekly),
            ("keep_monthly", keep_monthly),
        )
        if v is not None
    }
    if keep:
        body["retention"] = keep
    idle_given = (idle_below, for_s, sample_every_s, idle_action)
    if any(v is not None for v in idle_given) or ignore_ssh_sessions or dry_run:
        idle = {
            k: v for k, v in zip(("gpu_util_below", "for_s", "sample_every_s", "action"), idle_given) if v is not None
        }
        if ignore_ssh_sessions:
            idle["respect_ssh_sessions"] = False
        if dry_run:
            idle["dry_run"] = True
        body["idle"] = idle
    return body


@policy.command("show")
@click.argument("instance_id")
@json_option
@api_command
def policy_show(api: ApiClient, instance_id: str, as_json: bool) -> None:
    """Show the machine's policy and its next scheduled run."""
    answer = api.get(f"/api/instances/{seg(instance_id)}/policy")
    echo_json(answer) if as_json else click.echo(render.policy_detail(answer))


@policy.command("rm")
@click.argument("instance_id")
@api_command
def policy_rm(api: ApiClient, instance_id: str) -> None:
    """Remove the machine's policy (jobs it started go on)."""
    api.delete(f"/api/instances/{seg(instance_id)}/policy")
    click.echo(f"policy of {instance_id} removed")
