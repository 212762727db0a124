"""What job kinds share when they work on a GPU host: open an SSH session to a machine (pinning its host
key on first use), run a remote script and turn its events into job progress or a job error."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from src.adapters.remote_errors import RemoteStateUnknown
from src.db import rowcount, transaction
from src.errors import JobFailed
from src.jobs.context import JobContext
from src.models import Machine
from src.services.machines import add_event

logger = logging.getLogger(__name__)
CREDENTIALS_TTL_MARGIN_S = 600

_PROGRESS_KEYS = ("phase", "bytes_done", "bytes_total", "parts_done", "parts_total")


@dataclass(frozen=True)
class Endpoint:
    machine_id: str
    host: str
    port: int
    user: str
    host_key: str | None


def machine_endpoint(ctx: JobContext, machine_id: str) -> Endpoint:
    """The machine's current SSH endpoint. Raises JobFailed(`no_ssh_endpoint`) when it has none."""
    with transaction(ctx.container.session_factory) as s:
        m = s.get(Machine, machine_id)
        if m is None or not m.ssh_host or not m.ssh_port:
            raise JobFailed(f"machine {machine_id} has no SSH endpoint", code="no_ssh_endpoint")
        return Endpoint(
            machine_id=m.id,
            host=m.ssh_host,
            port=m.ssh_port,
            user=m.ssh_user or ctx.settings.ssh_user,
            host_key=m.host_key,
        )


@contextmanager
def ssh_session(ctx: JobContext, endpoint: Endpoint) -> Iterator[Any]:
    """An open `RemoteSession` to `endpoint`. A machine without a pinned host key gets the presented key
    pinned now (trust on first use); a pinned key that differs fails inside `open` with
    `host_key_mismatch`, before anything is authenticated or run. The job's cancel event (also set
    when the job passes its deadline) is the session's: any SSH wait ends as soon as it is set.
    A remote script that could not be confirmed dead (`remote_state_unknown`) is recorded as a
    machine event before the error goes on: the workspace may have changed."""
    from src.adapters.remote_types import SshTarget, host_key_fingerprint

    ctx.progress(phase="connect")
    target = SshTarget(host=endpoint.host, port=endpoint.port, user=endpoint.user, pinned_host_key=endpoint.host_key)
    with ctx.container.ssh().open(target, cancel=ctx.cancel_event) as session:
        if endpoint.host_key is None:
            with ctx.owned() as s:  # fenced: only while this attempt owns the job
                pinned = rowcount(
                    s.execute(
                        update(Machine)
                        .where(Machine.id == endpoint.machine_id, Machine.host_key.is_(None))
                        .values(host_key=session.host_key)
                    )
                )
                if pinned:
                    add_event(
                        s,
                        endpoint.machine_id,
                        "host_key_pinned",
                        f"pinned {host_key_fingerprint(session.host_key)} on first use",
                        job_id=ctx.job_id,
                    )
        try:
            yield session
        except RemoteStateUnknown as e:
            _record_state_unknown(ctx, endpoint, e)
            raise


def _record_state_unknown(ctx: JobContext, endpoint: Endpoint, error: RemoteStateUnknown) -> None:
    logger.error(
        "job %s: remote script %s on %s:%d may still be running: %s",
        ctx.job_id,
        error.script,
        endpoint.host,
        endpoint.port,
        error.message,
        extra={"job_id": ctx.job_id},
    )
    with transaction(ctx.container.session_factory) as s:
        add_event(
            s,
            endpoint.machine_id,
            "remote_state_unknown",
            f"the {error.script} script was stopped ({error.cause.code}) but could not be confirmed dead; "
            "it may still be running, and the workspace may have changed",
            job_id=ctx.job_id,
            data={
                "script": error.script,
                "pgid": error.pgid,
                "cause": error.cause.code,
                "host": endpoint.host,
                "port": endpoint.port,
            },
        )


def run_script(ctx: JobContext, session: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run remote script `name` and return its `result` event. Progress events become job progress; an
    `error` event becomes JobFailed with the script's code. Cancel kills the remote process group."""
    events = session.run_script(
        name, params, cancel=ctx.cancel_event, idle_timeout_s=ctx.settings.remote_idle_timeout_s
    )
    result: dict[str, Any] | None = None
    # closing(): the stream is ended here, while the session is open, not whenever it is collected;
    # ending it early stops the script and confirms it gone (or raises `remote_state_unknown`).
    failure: dict[str, Any] | None = None
    with closing(events):
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                ctx.progress(**{k: event[k] for k in _PROGRESS_KEYS if k in event})
            elif kind == "result":
                result = event
            elif kind == "error" and failure is None:
                failure = event  # the last line: read on to the script's exit rather than kill it
    if failure is not None:
        raise JobFailed(
            str(failure.get("message") or "the remote script failed"), code=str(failure.get("code") or "remote_error")
        )
    if result is None:
        raise JobFailed(f"the {name} script ended without a result", code="remote_error")
    return result


def storage_params(ctx: JobContext, *, prefix: str, write: bool) -> dict[str, Any]:
    """The bucket and the credentials a remote script gets (sent as JSON on stdin, never in argv): minted
    for this job, reaching only `prefix`, read-only unless `write`, valid past the job's deadline. Without
    a scoped broker configured the parent key is sent, as the start-up log and `/readyz` warn."""
    s = ctx.settings
    broker = ctx.container.host_credentials()  # NotConfigured before any SSH work when there is no bucket
    creds = broker.for_prefix(prefix, write=write, ttl_s=credentials_ttl_s(ctx))
    if creds.scoped:
        logger.info(
            "job %s: %s credentials minted for %s (%s)",
            ctx.job_id,
            "read-write" if write else "read-only",
            prefix,
            creds.source,
        )
    return {"endpoint": s.r2_endpoint, "bucket": s.r2_bucket, "region": s.r2_region, **creds.s3_fields()}


def credentials_ttl_s(ctx: JobContext) -> int:
    """How long a job's host credentials live: past the attempt's whole deadline (JOB_DEADLINE_*_S), so
    that they never expire under a job that is still allowed to run, and not much longer."""
    return int(ctx.deadline_s) + CREDENTIALS_TTL_MARGIN_S
