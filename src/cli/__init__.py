"""The `gpusnap` command: server administration (`db`, `tokens`, `worker`, `serve`) and a runbook client
of the REST API (`snapshots`, `instances`, `jobs`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from src.cli.admin import db, serve, tokens, worker
from src.cli.client import register as register_client
from src.errors import GpusnapError, one_line

logger = logging.getLogger(__name__)


class _OneLineErrors(click.Group):
    """No traceback reaches a user of the CLI: commands turn the failures they expect into
    `error: <code>: <message>` themselves; anything else that escapes is printed the same way, in one
    line, exit 1. GPUSNAP_DEBUG=1 lets the traceback through, for a bug report."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except GpusnapError as e:
            if os.environ.get("GPUSNAP_DEBUG"):
                raise
            click.echo(f"error: {e.code}: {one_line(e.message)}", err=True)
            ctx.exit(1)
        except Exception as e:  # the last net: one line, not a traceback, and how to see the rest
            if os.environ.get("GPUSNAP_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            click.echo(
                f"error: internal: {type(e).__name__}: {first} (set GPUSNAP_DEBUG=1 for the traceback)", err=True
            )
            ctx.exit(1)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gpusnap: hibernate and wake GPU machines; snapshot workspaces to S3/R2."""


for command in (db, tokens, worker, serve):
    main.add_command(command)
register_client(main)  # snapshots, instances, jobs
