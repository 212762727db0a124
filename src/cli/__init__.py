"""The `gpusnap` command: server administration (`db`, `tokens`, `worker`, `serve`) and a runbook client
of the REST API (`snapshots`, `instances`, `jobs`)."""
from __future__ import annotations

import click

from src.cli.admin import db, serve, tokens, worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gpusnap: hibernate and wake GPU machines; snapshot workspaces to S3/R2."""


for command in (db, tokens, worker, serve):
    main.add_command(command)

try:  # the runbook client lives in its own module
    from src.cli.client import register as _register_client
except ImportError:  # pragma: no cover - during development only
    _register_client = None
if _register_client is not None:
    _register_client(main)
