"""Response shapes of the dashboard endpoints: stream tokens, the events of GET /api/events, and
GET /api/summary."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from src.api.schemas import JobError, JobProgress


class StreamTokenResponse(BaseModel):
    token: str = Field(description="Use as `GET /api/events?token=`; refused by every other endpoint")
    expires_at: str
    expires_in: int = Field(description="Seconds (STREAM_TOKEN_TTL_S)")
    scope: Literal["events"]


class StreamEventJob(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str | None
    progress: JobProgress
    error: JobError | None
    machine_id: str | None
    snapshot_id: str | None


class StreamEventEntry(BaseModel):
    kind: str
    message: str
    data: dict[str, Any] | None


class StreamEvent(BaseModel):
    """The JSON of one `data:` line of GET /api/events."""

    id: int = Field(description="The same as the event's `id:` line; resume after it with Last-Event-ID")
    kind: Literal["job.status", "job.phase", "job.progress", "machine.status", "machine.event"]
    at: str
    machine_id: str | None
    job_id: str | None
    job: StreamEventJob | None = Field(None, description="job.* events: the job as it is after the change")
    event: StreamEventEntry | None = Field(None, description="machine.event: the machine's new history entry")
    from_: str | None = Field(None, alias="from", description="machine.status: the status before")
    to: str | None = Field(None, description="machine.status: the status now")
    hourly_usd: float | None = Field(None, description="machine.status: the hourly price in force")


class MachineTotals(BaseModel):
    total: int
    live: int = Field(description="Machines with a billed instance (running and its transitions)")
    paused: int
    hibernated: int
    by_status: dict[str, int]


class CostTotals(BaseModel):
    live_hourly_usd: float = Field(description="Sum of the hourly prices of the live machines")
    spent_usd: float
    saved_usd: float
    stored_bytes: int
    storage_usd_month: float
    storage_price_gb_month: float


class JobTotals(BaseModel):
    by_status: dict[str, int]
    active: int


class Summary(BaseModel):
    machines: MachineTotals
    costs: CostTotals
    jobs: JobTotals
    as_of: str
