"""Machines: the logical identity of a GPU host across hibernate and wake, its SSH endpoint and pinned
host key, and the history of what was done to it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from src.db import transaction
from src.errors import NotFound, storable
from src.models import Job, Machine, MachineEvent, MachinePolicy
from src.services.costs import machine_costs
from src.services.pagination import Page, fetch_page
from src.services.store_usage import store_bytes
from src.services.views import machine_view


def machine_id_for(*, instance_id: str | None, host: str, port: int) -> str:
    """SSH targets named without a machine id get one from their endpoint."""
    return instance_id or f"{host}:{port}"


def resolve_alias(s: Session, machine_id: str) -> str:
    """The id of the machine `machine_id` names: itself, or, when no machine has that id, the machine now
    running on the vast.ai instance of that number (after a wake, clients may use the new instance id).
    Requests that register a target must resolve it, or one host gets two machine rows and two locks."""
    if s.get(Machine, machine_id) is not None:
        return machine_id
    vast_id = vast_instance_id_of(machine_id)
    if vast_id is not None:
        alias = s.scalar(select(Machine.id).where(Machine.vast_instance_id == vast_id))
        if alias is not None:
            return alias
    return machine_id


def ensure_machine(
    s: Session,
    *,
    machine_id: str,
    host: str | None,
    port: int | None,
    user: str | None,
    workspace_path: str | None = None,
) -> Machine:
    """The machine row, created on first mention. A new SSH endpoint for a known machine replaces the old
    one and is recorded, but the host-key pin stays: the pin belongs to the machine, not to the name it
    was reached by (`localhost` and `127.0.0.1` are one host), so a request cannot reset it by naming
    the machine differently. It is cleared only when a wake moves the machine onto a new instance, or
    explicitly with `forget_host_key`."""
    machine = s.get(Machine, machine_id, with_for_update=True)
    if machine is None:
        # Two first requests for one new id race here: both see no row. An insert that does nothing on a
        # conflict lets the second wait for the first to commit and then go on with the row the first
        # made (and usually a 409: the machine is busy), instead of failing on the primary key (a 500).
        created = _insert_if_absent(
            s,
            id=machine_id,
            status="running" if host else "unknown",
            ssh_host=host,
            ssh_port=port,
            ssh_user=user,
            workspace_path=workspace_path,
        )
        machine = s.get(Machine, machine_id, with_for_update=True, populate_existing=True)
        assert machine is not None
        if created:
            add_event(s, machine_id, "registered", f"first seen at {host}:{port}" if host else "registered")
            return machine
    if host is not None and (machine.ssh_host, machine.ssh_port) != (host, port):
        if machine.ssh_host is not None:
            kept = "; host key pin kept" if machine.host_key else ""
            add_event(
                s,
                machine_id,
                "endpoint_changed",
                f"SSH endpoint {machine.ssh_host}:{machine.ssh_port} -> {host}:{port}{kept}",
            )
        machine.ssh_host, machine.ssh_port = host, port
    if user is not None:
        machine.ssh_user = user
    if workspace_path is not None:
        machine.workspace_path = workspace_path
    return machine


def _insert_if_absent(s: Session, **values: Any) -> bool:
    """INSERT the machine row unless one with its id exists (committed by a concurrent request, which this
    waits for). Returns whether this call inserted it."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
    else:  # pragma: no cover - the service runs on SQLite or PostgreSQL
        raise NotImplementedError(f"ensure_machine does not support {dialect}")
    stmt = (
        dialect_insert(Machine)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[Machine.id])
        .returning(Machine.id)
    )  # RETURNING, not rowcount: psycopg reports -1 for this statement
    return s.execute(stmt).scalar_one_or_none() is not None


def forget_host_key(session_factory: sessionmaker[Session], machine_id: str) -> dict[str, Any]:
    """Clear the machine's pinned host key, so the next connection trusts (and pins) whatever key the
    host presents: for an operator who knows the machine was re-installed or re-keyed. Recorded as a
    `host_key_forgotten` event with the old key's fingerprint. Idempotent. Raises NotFound."""
    from src.adapters.remote_types import host_key_fingerprint

    with transaction(session_factory) as s:
        machine = find_machine(s, machine_id)
        s.refresh(machine, with_for_update=True)
        old = machine.host_key
        if old is not None:
            machine.host_key = None
            add_event(
                s,
                machine.id,
                "host_key_forgotten",
                f"host key pin {host_key_fingerprint(old)} cleared on request; the next connection pins "
                "the key the host presents",
                data={"fingerprint": host_key_fingerprint(old)},
            )
        else:
            add_event(s, machine.id, "host_key_forgotten", "no host key was pinned; nothing changed")
        s.flush()
        return get_machine_in(s, machine)


def add_event(
    s: Session,
    machine_id: str,
    kind: str,
    message: str,
    *,
    job_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    s.add(MachineEvent(machine_id=machine_id, kind=kind, message=storable(message), job_id=job_id, data=data))


def active_job_id(s: Session, machine_id: str) -> str | None:
    return s.scalar(select(Job.id).where(Job.lock_key == f"machine:{machine_id}"))


def get_machine(
    session_factory: sessionmaker[Session],
    machine_id: str,
    *,
    events: int = 100,
    storage_price_gb_month: float | None = None,
) -> dict[str, Any]:
    """The machine, its active job and its latest `events` history entries (oldest first); with
    `storage_price_gb_month`, its `costs` too."""
    with transaction(session_factory) as s:
        return get_machine_in(
            s, find_machine(s, machine_id), events=events, storage_price_gb_month=storage_price_gb_month
        )


def get_machine_in(
    s: Session, machine: Machine, *, events: int = 100, storage_price_gb_month: float | None = None
) -> dict[str, Any]:
    from src.services.policies import policy_view

    history = list(
        s.scalars(
            select(MachineEvent)
            .where(MachineEvent.machine_id == machine.id)
            .order_by(MachineEvent.id.desc())
            .limit(events)
        )
    )
    view = machine_view(
        machine,
        events=list(reversed(history)),
        active_job_id=active_job_id(s, machine.id),
        store_bytes=store_bytes(s, machine.id),
    )
    if storage_price_gb_month is not None:
        view["costs"] = machine_costs(s, machine, storage_price_gb_month=storage_price_gb_month)
    policy = s.get(MachinePolicy, machine.id)
    view["policy"] = policy_view(s, policy) if policy is not None else None
    return view


def vast_instance_id_of(machine_id: str) -> int | None:
    """`machine_id` as a vast.ai instance id: ASCII digits that fit the BIGINT column, else None
    (`str.isdigit` also accepts '²', which `int` refuses, and a longer number overflows the column)."""
    if not (machine_id.isascii() and machine_id.isdigit()) or len(machine_id) > 18:
        return None
    return int(machine_id)


def find_machine(s: Session, machine_id: str) -> Machine:
    """By its id, or by the vast.ai instance id it runs on now. Raises NotFound."""
    machine = s.get(Machine, machine_id)
    vast_id = vast_instance_id_of(machine_id)
    if machine is None and vast_id is not None:
        machine = s.scalar(select(Machine).where(Machine.vast_instance_id == vast_id))
    if machine is None:
        raise NotFound(f"machine {machine_id} not found")
    return machine


def list_machines(
    session_factory: sessionmaker[Session],
    *,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    storage_price_gb_month: float | None = None,
) -> Page:
    """A page of machines; with `storage_price_gb_month`, each with its `costs`."""
    query = select(Machine)
    if status:
        query = query.where(Machine.status == status)

    def view(s: Session, m: Machine) -> dict[str, Any]:
        out = machine_view(m, active_job_id=active_job_id(s, m.id), store_bytes=store_bytes(s, m.id))
        if storage_price_gb_month is not None:
            out["costs"] = machine_costs(s, m, storage_price_gb_month=storage_price_gb_month)
        return out

    return fetch_page(
        session_factory, query, id_column=Machine.id, limit=limit, cursor=cursor, newest_first=False, view=view
    )
