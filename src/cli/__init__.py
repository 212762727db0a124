"""The `gpusnap` command: server administration (`db`, `tokens`, `worker`, `serve`) and a runbook client
of the REST API (`snapshots`, `instances`, `jobs`)."""
from __future__ import annotations

import click

from src.cli.admin import db, serve, tokens, worker
from src.cli.client import register as register_client


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gpusnap: hibernate and wake GPU machines; snapshot workspaces to S3/R2."""


for command in (db, tokens, worker, serve):
    main.add_command(command)
register_client(main)  # snapshots, instances, jobs
