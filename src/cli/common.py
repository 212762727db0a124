"""What every command of the runbook client shares: its options, the API call wrapper, how a job is
started and followed, how lists and items are shown. The commands themselves live in client_jobs,
client_snapshots, client_instances and client_policies; client.register adds them to `gpusnap`.

Every command takes `--url` (GPUSNAP_URL) and `--token` (GPUSNAP_TOKEN). Errors print as
`error: <code>: <message>` on stderr with exit status 1; waiting for a job exits 0 when it succeeded,
1 when it failed or was cancelled, 2 when `--timeout` ran out first."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from src.cli import render
from src.cli.http import DEFAULT_URL, ApiClient, ClientError
from src.cli.progress import WaitTimeout, wait_for_job
from src.errors import one_line

EXIT_FAILED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 130
CODECS = ("auto", "zstd", "zstd-planes", "nvcomp-ans", "none")


class CliFailure(click.ClickException):
    """`error: <code>: <message>` on stderr and a chosen exit status."""

    def __init__(self, code: str, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it from the instance too

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.code}: {one_line(self.message)}", err=True)


# ---- shared options ----------------------------------------------------------------------------


def api_command(f: Callable[..., None]) -> Callable[..., None]:
    """Adds `--url`/`--token`, passes an `ApiClient` as the first argument, turns `ClientError` into exit 1."""

    @functools.wraps(f)
    def wrapper(*args: Any, url: str, token: str | None, **kwargs: Any) -> None:
        try:
            api = ApiClient(url, token)
            try:
                f(api, *args, **kwargs)
            finally:
                api.close()
        except ClientError as e:
            raise CliFailure(e.code, e.message) from None

    wrapper = click.option(
        "--token", envvar="GPUSNAP_TOKEN", show_envvar=True, show_default=False, help="Bearer token."
    )(wrapper)
    return click.option(
        "--url",
        envvar="GPUSNAP_URL",
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="Base URL of the gpusnap API.",
    )(wrapper)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer (for scripts).")
idempotency_option = click.option(
    "--idempotency-key",
    default=None,
    help="Send Idempotency-Key: a retry with the same key and body gets the same job.",
)


def wait_options(f: Callable[..., None]) -> Callable[..., None]:
    f = click.option(
        "--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, help="Seconds between polls."
    )(f)
    f = click.option(
        "--timeout",
        type=click.FloatRange(min=0),
        default=None,
        help="With --wait: give up (exit 2) after this many seconds; the job goes on.",
    )(f)
    return click.option("--wait", is_flag=True, help="Follow the job to its end (as `gpusnap jobs wait`).")(f)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def given(**fields: Any) -> dict[str, Any]:
    """The options the user set: the server applies its own defaults to the rest."""
    return {k: v for k, v in fields.items() if v is not None and v != ()}


# ---- jobs: submit, wait, report ------------------------------------------------------------------


def submitted(
    api: ApiClient,
    answer: dict[str, Any],
    *,
    as_json: bool,
    wait: bool,
    timeout: float | None,
    interval: float,
    lead: str | None = None,
) -> None:
    """What every mutating command does with its `202 {"job": ...}`: print it, or follow it with `--wait`."""
    job = answer["job"]
    if not as_json:
        if lead:
            click.echo(lead)
        click.echo(render.job_summary(job))
    if not wait:
        if as_json:
            echo_json(answer)
        else:
            click.echo(f"follow it: gpusnap jobs wait {job['id']}")
        return
    follow(api, job["id"], timeout=timeout, interval=interval, as_json=as_json)


def job_command(
    lead: Callable[[dict[str, Any]], str] | None = None,
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., None]]:
    """For a command that starts a job: adds `--idempotency-key`, `--wait`/`--timeout`/`--interval`, `--json`
    and the API options. The command gets the `ApiClient` and `idempotency_key`, sends its request and returns
    the `202 {"job": ...}` answer; `submitted` prints it or follows the job. `lead` makes a line shown first."""

    def decorate(f: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        @functools.wraps(f)
        def command(
            api: ApiClient, *args: Any, wait: bool, timeout: float | None, interval: float, as_json: bool, **kwargs: Any
        ) -> None:
            answer = f(api, *args, **kwargs)
            submitted(
                api,
                answer,
                as_json=as_json,
                wait=wait,
                timeout=timeout,
                interval=interval,
                lead=lead(answer) if lead else None,
            )

        return idempotency_option(wait_options(json_option(api_command(command))))

    return decorate


def follow(api: ApiClient, job_id: str, *, timeout: float | None, interval: float, as_json: bool) -> None:
    """Poll the job to its end with a progress display on stderr; exit 0, 1 (failed/cancelled) or 2 (timeout)."""
    try:
        job = wait_for_job(api, job_id, timeout=timeout, interval=interval)
    except WaitTimeout as e:
        if as_json and e.job is not None:
            echo_json(e.job)
        raise CliFailure(
            "timeout",
            f"job {job_id} is {_state(e.job)} after {timeout:g}s; it goes on without us "
            f"(`gpusnap jobs wait {job_id}` to follow it again)",
            exit_code=EXIT_TIMEOUT,
        ) from None
    except KeyboardInterrupt:
        raise CliFailure(
            "interrupted",
            f"stopped waiting; job {job_id} goes on (`gpusnap jobs cancel {job_id}` to stop it)",
            exit_code=EXIT_INTERRUPTED,
        ) from None
    if as_json:
        echo_json(job)
    else:
        click.echo(render.job_summary(job))
        if job.get("result"):
            click.echo(f"result: {json.dumps(job['result'], sort_keys=True)}")
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": job["status"], "message": f"job {job_id} {job['status']}"}
        raise CliFailure(error["code"], error["message"] or f"job {job_id} {job['status']}")


def _state(job: dict[str, Any] | None) -> str:
    if job is None:
        return "not readable yet"
    return f"still {job['status']}" + (f" (phase {job['phase']})" if job.get("phase") else "")


def list_all(api: ApiClient, path: str, params: dict[str, Any], *, follow_cursor: bool) -> dict[str, Any]:
    """One page, or with `follow_cursor` every page: `{"items": [...], "next_cursor": ...}`."""
    page = api.get(path, params)
    items = list(page["items"])
    while follow_cursor and page.get("next_cursor"):
        page = api.get(path, {**params, "cursor": page["next_cursor"]})
        items.extend(page["items"])
    return {"items": items, "next_cursor": page.get("next_cursor")}


def show_one(item: dict[str, Any], detail: Callable[[dict[str, Any]], str], *, as_json: bool) -> None:
    if as_json:
        echo_json(item)
    else:
        click.echo(detail(item))


def show_list(page: dict[str, Any], rows: Callable[[list[dict[str, Any]]], str], *, noun: str, as_json: bool) -> None:
    if as_json:
        echo_json(page)
        return
    click.echo(rows(page["items"]) if page["items"] else f"no {noun}")
    if page.get("next_cursor"):
        click.echo(f"more {noun}: --cursor {page['next_cursor']} (or --all)", err=True)


def page_options(f: Callable[..., None]) -> Callable[..., None]:
    f = click.option("--all", "all_pages", is_flag=True, help="Follow next_cursor to the end.")(f)
    f = click.option("--cursor", default=None, help="Start at this page (from an earlier listing).")(f)
    return click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True, help="Items per page.")(
        f
    )


# ---- jobs ----------------------------------------------------------------------------------------
