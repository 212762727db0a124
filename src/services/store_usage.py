"""What a machine's snapshots occupy in the bucket, counted once: the machine view's `store_bytes` and the
storage cost of `costs` both read it, so they never disagree."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from src.models import Snapshot, StoreObject


def store_bytes(s: Session, machine_id: str) -> int:
    """The machine's chunk store (format 2: an object shared by many snapshots counts once, whatever
    its state: one marked for deletion is still billed until gc removes it) plus its complete format-1
    snapshots (each holds its own parts)."""
    chunked = s.scalar(select(func.coalesce(func.sum(StoreObject.size), 0)).where(StoreObject.machine_id == machine_id))
    v1 = s.scalar(
        select(func.coalesce(func.sum(Snapshot.stored_bytes), 0)).where(
            Snapshot.machine_id == machine_id, Snapshot.format == 1, Snapshot.status == "complete"
        )
    )
    return int(chunked or 0) + int(v1 or 0)
