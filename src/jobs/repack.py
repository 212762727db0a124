"""gc's repack of packs that are mostly garbage (placeholder until implemented)."""
from __future__ import annotations

from src.jobs.context import JobContext


def repack_machine(ctx: JobContext, machine_id: str, prefix: str) -> tuple[int, int]:
    return 0, 0
