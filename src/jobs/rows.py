"""Recording what a job did to a machine: its columns and its event history, in one transaction."""
from __future__ import annotations

from typing import Any

from src.db import transaction
from src.jobs.context import JobContext
from src.models import Machine
from src.services.machines import add_event


def set_machine(ctx: JobContext, machine_id: str, *, event: tuple[str, str] | None = None,
                data: dict[str, Any] | None = None, **values: Any) -> None:
    """Update the machine's columns (`values`) and append `event` (kind, message)."""
    with transaction(ctx.container.session_factory) as s:
        machine = s.get(Machine, machine_id)
        if machine is None:
            return
        for key, value in values.items():
            setattr(machine, key, value)
        if event is not None:
            add_event(s, machine_id, event[0], event[1], job_id=ctx.job_id, data=data)


def machine_fields(ctx: JobContext, machine_id: str) -> dict[str, Any]:
    with transaction(ctx.container.session_factory) as s:
        m = s.get(Machine, machine_id)
        if m is None:
            return {}
        return {"id": m.id, "status": m.status, "vast_instance_id": m.vast_instance_id, "ssh_host": m.ssh_host,
                "ssh_port": m.ssh_port, "ssh_user": m.ssh_user, "host_key": m.host_key, "gpu_name": m.gpu_name,
                "workspace_path": m.workspace_path}
