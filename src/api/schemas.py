"""Request and response models. They validate requests (unknown fields rejected) and generate the
OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from src.api.schemas_costs import MachineCosts
from src.services import cron

# ---- field types -------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
# Host names and IPv4 addresses, or anything IPv6-shaped (checked for real by _check_host).
_HOST_PATTERN = rf"^(?:{_LABEL}(?:\.{_LABEL})*\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$"


def _check_host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ValueError("must be a host name or an IP address")
    return value.lower().rstrip(".")


def _check_workspace_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    parts = [p for p in value.split("/") if p]
    if any(p in ("..", ".") for p in parts):
        raise ValueError("must not contain '.' or '..' components")
    if not parts:
        raise ValueError("must not be the root directory")
    return "/" + "/".join(parts)


_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"

MachineId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="Machine id: the vast.ai instance id it was first known by, or any name",
    ),
]
SshHost = Annotated[
    str,
    Field(min_length=1, max_length=253, description="Host name or IP address", pattern=_HOST_PATTERN),
    AfterValidator(_check_host),
]
SshPort = Annotated[int, Field(ge=1, le=65535)]
SshUser = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")]
WorkspacePath = Annotated[
    str,
    Field(
        min_length=2,
        max_length=1024,
        pattern=r"^(/(?!\.{1,2}(/|$))[^/\x00-\x1f\x7f]+)+/?$",
        description="Absolute path, no '..' components, not '/'",
    ),
    AfterValidator(_check_workspace_path),
]
SnapshotName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:-]*$")]
Codec = Literal["auto", "zstd", "zstd-planes", "nvcomp-ans", "none"]
ExcludePattern = Annotated[str, Field(min_length=1, max_length=1024, pattern=_PRINTABLE)]
SnapshotId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")]


class _Strict(BaseModel):
    # python-re: the workspace path pattern needs a look-ahead, which pydantic's default engine lacks.
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


# ---- requests ----------------------------------------------------------------------------------


class CreateSnapshotRequest(_Strict):
    instance_id: MachineId
    ssh_host: SshHost
    ssh_port: SshPort
    workspace_path: WorkspacePath
    ssh_user: SshUser | None = None
    snapshot_name: SnapshotName | None = None
    codec: Codec = "auto"
    excludes: list[ExcludePattern] = Field(default_factory=list, max_length=256)


class RestoreSnapshotRequest(_Strict):
    ssh_host: SshHost
    ssh_port: SshPort
    workspace_path: WorkspacePath = Field(
        description="Directory to replace. System directories are refused "
        "with 422 `system_path` (deny list in the README)"
    )
    ssh_user: SshUser | None = None
    instance_id: MachineId | None = None
    overwrite: bool = Field(
        False,
        description="Replace a non-empty workspace_path (kept beside it as "
        "`<path>.gpusnap-old-<UTC timestamp>` until the next successful "
        "restore there). Without it the job fails with `workspace_exists`",
    )
    keep_setuid: StrictBool = Field(
        False,
        description="Restore setuid/setgid bits as archived; by default they are "
        "cleared (FIFOs and device nodes are never restored)",
    )


class VerifySnapshotRequest(_Strict):
    deep: bool = Field(False, description="Re-download every part and check its SHA-256, not only its size")


class HibernateRequest(_Strict):
    workspace_path: WorkspacePath
    ssh_host: SshHost | None = None
    ssh_port: SshPort | None = None
    ssh_user: SshUser | None = None
    destroy_after: bool = True
    deep_verify: bool = Field(
        False,
        description="Before destroying, re-download every part and check its "
        "SHA-256 (the default checks every part's size and the manifest)",
    )
    codec: Codec = "auto"
    excludes: list[ExcludePattern] = Field(default_factory=list, max_length=256)


class WakeRequest(_Strict):
    snapshot_id: SnapshotId | None = None
    gpu_type: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.-]+$")] | None = None
    num_gpus: (
        Annotated[
            int,
            Field(
                ge=1,
                le=16,
                description="Default: the machine's own GPU count, as recorded "
                "when it was rented or hibernated (else 1)",
            ),
        ]
        | None
    ) = None
    region: Annotated[str, Field(min_length=2, max_length=32, pattern=r"^[A-Za-z-]+$")] | None = None
    max_price: Annotated[float, Field(gt=0, le=1000, description="USD per hour")] | None = None
    disk_gb: Annotated[int, Field(ge=1, le=100_000)] | None = None
    image: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")] | None = None
    workspace_path: WorkspacePath | None = None
    priority: Annotated[
        StrictInt,
        Field(
            ge=0,
            le=9,
            description="place in the wake queue while WAKE_CONCURRENCY wakes run: 9 first, then older first",
        ),
    ] = 5


class EmptyRequest(_Strict):
    pass


def _check_cron(value: str) -> str:
    try:
        parsed = cron.parse(value)
    except cron.CronError as e:
        raise ValueError(str(e)) from None
    if not parsed.fires():
        raise ValueError("this expression never fires (no such day)")
    return " ".join(value.split())


CronExpression = Annotated[
    str,
    Field(
        min_length=9,
        max_length=128,
        pattern=r"^[A-Za-z0-9*/,\- ]+$",
        description="5-field cron expression in UTC: minute hour day-of-month month day-of-week",
    ),
    AfterValidator(_check_cron),
]
_KEEP = Annotated[StrictInt, Field(ge=0, le=10_000)]


class RetentionPolicy(_Strict):
    """restic `forget` rules, ORed: a complete snapshot is kept when any rule keeps it."""

    keep_last: _KEEP = Field(0, description="the newest N complete snapshots")
    keep_daily: _KEEP = Field(0, description="the newest snapshot of each of the last N days (UTC) that have one")
    keep_weekly: _KEEP = Field(0, description="the newest snapshot of each of the last N ISO weeks that have one")
    keep_monthly: _KEEP = Field(0, description="the newest snapshot of each of the last N months that have one")

    @model_validator(mode="after")
    def _keeps_something(self) -> RetentionPolicy:
        if not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly):
            raise ValueError("retention keeps nothing: set at least one keep_* above 0 (or leave retention out)")
        return self


class IdlePolicy(_Strict):
    gpu_util_below: Annotated[StrictInt, Field(ge=1, le=100)] = Field(
        5, description="percent; every GPU's every sample must be below it"
    )
    for_s: Annotated[StrictInt, Field(ge=1, le=30 * 86400)] = Field(1800, description="the window, in seconds")
    sample_every_s: Annotated[StrictInt, Field(ge=1, le=86400)] = Field(
        60, description="seconds between samples (the worker's scheduler ticks once a minute)"
    )
    action: Literal["hibernate", "pause", "notify"] = "hibernate"
    respect_ssh_sessions: StrictBool = Field(True, description="an interactive SSH session keeps the machine awake")
    dry_run: StrictBool = Field(False, description="record what the action would do (an event), do nothing")

    @model_validator(mode="after")
    def _window_holds_a_sample(self) -> IdlePolicy:
        if self.for_s < self.sample_every_s:
            raise ValueError("for_s must be at least sample_every_s")
        return self


class PolicyRequest(_Strict):
    workspace_path: WorkspacePath | None = Field(
        None, description="what scheduled snapshots and hibernate take (default: the machine's own workspace_path)"
    )
    excludes: list[ExcludePattern] = Field(default_factory=list, max_length=256)
    codec: Codec = "auto"
    schedule: CronExpression | None = None
    retention: RetentionPolicy | None = None
    idle: IdlePolicy | None = None


class GcRequest(_Strict):
    grace_s: (
        Annotated[
            float,
            Field(
                ge=0,
                le=365 * 86400,
                description="Delete only unreferenced objects at least this old (default GC_GRACE_S)",
            ),
        ]
        | None
    ) = None


class DeleteSnapshotQuery(_Strict):
    force: bool = Field(
        False,
        description="Delete even the snapshot a hibernated machine would wake from (otherwise 409 `snapshot_needed`)",
    )


class SnapshotListQuery(_Strict):
    instance_id: MachineId | None = None
    status: Literal["pending", "running", "complete", "failed", "deleting"] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class JobListQuery(_Strict):
    kind: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")] | None = None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None
    instance_id: MachineId | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: Annotated[str, Field(min_length=1, max_length=128)] | None = None


MachineStatus = Literal[
    "unknown", "running", "hibernating", "hibernated", "waking", "pausing", "paused", "resuming", "error"
]


class InstanceListQuery(_Strict):
    status: MachineStatus | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # base64 of a 128-char machine id


EventKind = Annotated[
    str,
    Field(
        pattern=r"^(job|machine)(\.[a-z_]+)?(,(job|machine)(\.[a-z_]+)?)*$",
        max_length=256,
        description="Comma-separated event kinds (`job.progress`) or families (`job`, `machine`)",
    ),
]


class EventsQuery(_Strict):
    machine_id: Annotated[str, Field(min_length=1, max_length=128, pattern=_PRINTABLE)] | None = None
    job_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")] | None = None
    kind: EventKind | None = None
    last_event_id: (
        Annotated[
            int,
            Field(
                ge=0,
                le=2**62,
                description="Resume after this event id (for clients that "
                "cannot send the Last-Event-ID header; the header wins)",
            ),
        ]
        | None
    ) = None
    token: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=128,
                description="A stream token from POST /api/stream-tokens, instead of the Authorization header",
            ),
        ]
        | None
    ) = None


# ---- responses ---------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobProgress(BaseModel):
    bytes_done: int | None
    bytes_total: int | None = Field(
        description="null while unknown: a snapshot's total comes from a walk of the tree that runs beside "
        "the upload and may end after its first parts (a retried step shows its earlier try's total until then)"
    )
    parts_done: int | None
    parts_total: int | None


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str | None
    progress: JobProgress
    result: dict[str, Any] | None
    error: JobError | None
    machine_id: str | None
    snapshot_id: str | None
    attempts: int
    cancel_requested: bool
    remote_tries: int | None = Field(
        None,
        description="which try of the remote step the job is on, once a "
        "dropped SSH link or a failing bucket made it try again (REMOTE_TRIES)",
    )
    created_at: str
    started_at: str | None
    finished_at: str | None


class Snapshot(BaseModel):
    id: str
    name: str | None
    instance_id: str
    status: Literal["pending", "running", "complete", "failed", "deleting"]
    workspace_path: str
    source_host: str | None
    storage_prefix: str
    codec: str | None
    requires_gpu: bool = Field(
        False,
        description="Its parts need an NVIDIA GPU with CUDA 12+ to be decoded "
        "(codec nvcomp-ans: ANS has no CPU decoder). A wake rents only such hosts; a "
        "restore onto a host without one fails `gpu_required` before any download.",
    )
    parts: int | None
    part_size: int | None
    raw_bytes: int | None
    stored_bytes: int | None
    ratio: float | None = Field(description="raw_bytes / stored_bytes")
    file_count: int | None
    manifest_sha256: str | None
    format: Literal[1, 2] = Field(
        description="1: fixed parts of its own; 2: chunks shared with the machine's "
        "other snapshots (SNAPSHOT_FORMAT when it was taken)"
    )
    chunks_new: int | None = Field(None, description="format 2: chunks this snapshot uploaded")
    chunks_reused: int | None = Field(None, description="format 2: chunks the machine's store held already")
    bytes_uploaded: int | None = Field(
        None,
        description="format 2: stored bytes this snapshot uploaded "
        "(stored_bytes counts every object it references, shared ones included)",
    )
    parent_id: str | None
    excludes: list[str]
    durations: dict[str, Any]
    duration_s: float | None
    error: JobError | None
    created_at: str
    completed_at: str | None
    verified_at: str | None


class MachineEvent(BaseModel):
    kind: str
    message: str
    job_id: str | None
    data: dict[str, Any] | None
    at: str


class Policy(BaseModel):
    machine_id: str
    workspace_path: str | None
    excludes: list[str]
    codec: str
    schedule: str | None
    retention: RetentionPolicy | None
    idle: IdlePolicy | None
    next_run_at: str | None = Field(description="the next schedule slot (UTC)")
    last_slot_at: str | None = Field(description="the newest slot claimed by a worker (run or skipped)")
    created_at: str
    updated_at: str


class Machine(BaseModel):
    id: str
    status: str
    vast_instance_id: int | None
    ssh_host: str | None
    ssh_port: int | None
    ssh_user: str | None
    host_key_pinned: bool
    workspace_path: str | None
    last_snapshot_id: str | None
    gpu_name: str | None
    active_job_id: str | None
    store_bytes: int | None = Field(
        None,
        description="bytes the machine's snapshots occupy in the bucket: its "
        "chunk store (format 2, shared chunks counted once) plus its format-1 snapshots",
    )
    created_at: str
    updated_at: str
    events: list[MachineEvent] | None = None
    costs: MachineCosts | None = None
    policy: Policy | None = None


class SnapshotList(BaseModel):
    items: list[Snapshot]
    next_cursor: str | None


class JobList(BaseModel):
    items: list[Job]
    next_cursor: str | None


class MachineList(BaseModel):
    items: list[Machine]
    next_cursor: str | None


class SnapshotJobResponse(BaseModel):
    snapshot: Snapshot
    job: Job


class JobResponse(BaseModel):
    job: Job


class Health(BaseModel):
    status: str
    checks: dict[str, str] | None = None
    details: dict[str, str] | None = Field(
        default=None,
        description="Warnings that do not make the service "
        "unready, e.g. `host_credentials`: which credentials GPU hosts get",
    )
