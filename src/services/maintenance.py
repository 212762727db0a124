"""Maintenance operations: garbage collection of the machines' chunk stores (the `gc` job)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from src.db import transaction
from src.errors import Conflict
from src.services import jobs as job_service
from src.services.jobs import Idempotency
from src.services.views import job_view

if TYPE_CHECKING:
    from src.container import Container

GC_LOCK = "maintenance:gc"  # one gc at a time: two would mark and delete the same objects


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def start_gc(c: Container, *, grace_s: float | None = None, idem: Idempotency | None = None) -> dict[str, Any]:
    """Start a `gc` job (src/jobs/gc.py). Raises Conflict(`gc_running`) while one is queued or running,
    NotConfigured (no bucket)."""
    c.object_store()
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        try:
            job = job_service.add_job(s, kind="gc", params={"grace_s": grace_s}, lock_key=GC_LOCK, idem=idem)
        except Conflict as e:
            raise Conflict(f"a gc job is running already ({e.message})", code="gc_running") from None
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view
