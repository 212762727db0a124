"""The registry of job kinds: what runs, whether a kind is safe to re-run after a crash, and the hook
that updates domain rows when a job ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from src.jobs.context import JobContext
from src.services.jobs import OnEnd


@dataclass(frozen=True)
class JobKind:
    name: str
    run: Callable[[JobContext], dict[str, Any] | None]
    # Safe to run again from the start (with `ctx.state`) when its worker died mid-way. Kinds whose
    # steps are idempotent say True; others are failed with `interrupted` instead.
    rerunnable: bool = True
    on_end: OnEnd | None = None  # runs in the transaction that finishes the job (any final status)
    # A job of this kind that recovery would end without running again (a cancel accepted while its
    # worker was gone, or no attempts left) runs once more with `ctx.state["abandoned"]` set, to undo
    # what its dead attempts left behind (a wake destroys its rentals) before it ends.
    cleans_up: bool = False


def default_kinds() -> dict[str, JobKind]:
    """Every production job kind, by name."""
    from src.jobs import gc, hibernate, pause, storage_jobs, transfer_jobs, wake
    from src.jobs.scheduler import with_retention, with_wake_queue

    kinds = [*storage_jobs.KINDS, *transfer_jobs.KINDS, hibernate.KIND, wake.KIND, *pause.KINDS, gc.KIND]
    # A successful snapshot (scheduled, manual, or hibernate's) applies the machine's retention rules.
    kinds = [with_retention(k) if k.name in ("create_snapshot", "hibernate") else k for k in kinds]
    return {k.name: with_wake_queue(k) if k.name == "wake" else k for k in kinds}
