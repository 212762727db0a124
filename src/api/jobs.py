"""/api/jobs: read jobs, cancel one."""

from __future__ import annotations

from flask import Blueprint, Response

from src.api import schemas as m
from src.api.common import JOB_ID, container, ok
from src.api.routing import route
from src.services import jobs as service

bp = Blueprint("jobs", __name__, url_prefix="/api/jobs")
TAG = "jobs"


@route(bp, "", "GET", tag=TAG, summary="List jobs, newest first", query=m.JobListQuery, responses={200: m.JobList})
def list_jobs(query: m.JobListQuery) -> Response:
    page = service.list_jobs(
        container().session_factory,
        kind=query.kind,
        status=query.status,
        machine_id=query.instance_id,
        limit=query.limit,
        cursor=query.cursor,
    )
    return ok({"items": page.items, "next_cursor": page.next_cursor})


@route(
    bp,
    "/<job_id>",
    "GET",
    tag=TAG,
    summary="One job, with its phase and progress",
    responses={200: m.Job},
    path_params={"job_id": JOB_ID},
)
def get_job(job_id: str) -> Response:
    return ok(service.get_job(container().session_factory, job_id))


@route(
    bp,
    "/<job_id>/cancel",
    "POST",
    tag=TAG,
    summary="Cancel a job (a running one stops at its next heartbeat)",
    body=m.EmptyRequest,
    body_optional=True,
    responses={202: m.Job, 409: m.ErrorResponse},
    path_params={"job_id": JOB_ID},
    description="A 202 is final: the job ends `cancelled` (a hibernate cancelled before its destroy leaves "
    "the instance running). Past the job's point of no return (hibernate's destroy, wake's "
    "hand-over, pause's stop, resume's start) the answer is 409 `too_late_to_cancel` and the "
    "job finishes; a job that already succeeded or failed gives 409 `job_finished`.",
)
def cancel_job(job_id: str, body: m.EmptyRequest) -> Response:
    kinds = container().job_kinds
    job = service.cancel_job(
        container().session_factory, job_id, on_end=lambda k: kinds[k].on_end if k in kinds else None
    )
    return ok(job, 202)
