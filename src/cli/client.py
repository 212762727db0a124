"""The runbook client of the REST API: `gpusnap snapshots|instances|jobs|gc ...` (the shared parts:
src/cli/common.py)."""

from __future__ import annotations

import click

from src.cli.client_instances import instances
from src.cli.client_jobs import gc, jobs
from src.cli.client_snapshots import snapshots


def register(main: click.Group) -> None:
    """Add the client groups to the `gpusnap` command."""
    for group in (snapshots, instances, jobs, gc):
        main.add_command(group)
