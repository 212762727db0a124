"""Tables. Every change here comes with an Alembic migration in `migrations/versions/`."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """A time-ordered id (48-bit milliseconds + 80 random bits, Crockford base32, like a ULID), so that
    ordering by id is ordering by creation and cursors can be plain ids."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return f"{prefix}_{''.join(reversed(chars))}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}


class Machine(Base):
    """A logical machine: keeps its id across hibernate and wake while vast.ai instances come and go."""

    __tablename__ = "machines"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    vast_instance_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    status: Mapped[str] = mapped_column(String(32), default="unknown")
    ssh_host: Mapped[str | None] = mapped_column(String(255))
    ssh_port: Mapped[int | None] = mapped_column(Integer)
    ssh_user: Mapped[str | None] = mapped_column(String(64))
    host_key: Mapped[str | None] = mapped_column(Text)  # pinned on first use, OpenSSH one-line form
    workspace_path: Mapped[str | None] = mapped_column(String(1024))
    last_snapshot_id: Mapped[str | None] = mapped_column(String(64))
    gpu_name: Mapped[str | None] = mapped_column(String(128))
    offer: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what was rented last (price, disk, image)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MachineEvent(Base):
    """What was done to a machine, in order: the history `GET /api/instances/<id>` shows."""

    __tablename__ = "machine_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine_id: Mapped[str] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Snapshot(Base):
    __tablename__ = "snapshots"
    __table_args__ = (Index("ix_snapshots_machine_id_id", "machine_id", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    machine_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32), default="pending", index=True)
    storage_prefix: Mapped[str] = mapped_column(String(1024))
    workspace_path: Mapped[str] = mapped_column(String(1024))
    source_host: Mapped[str | None] = mapped_column(String(255))
    codec: Mapped[str | None] = mapped_column(String(32))
    requested_codec: Mapped[str] = mapped_column(String(32), default="auto")
    excludes: Mapped[list[str] | None] = mapped_column(JSON)
    part_count: Mapped[int | None] = mapped_column(Integer)
    part_size: Mapped[int | None] = mapped_column(BigInteger)
    raw_bytes: Mapped[int | None] = mapped_column(BigInteger)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    file_count: Mapped[int | None] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(String(64))  # base of a future incremental snapshot
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    verified_at: Mapped[dt.datetime | None] = mapped_column()
    # 1: fixed parts under its own prefix; 2: chunks shared by the machine's snapshots (docs/data-plane.md).
    format: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    chunks_new: Mapped[int | None] = mapped_column(Integer)
    chunks_reused: Mapped[int | None] = mapped_column(Integer)
    bytes_uploaded: Mapped[int | None] = mapped_column(BigInteger)
    # Set while gc's repack switches this snapshot to a rewritten manifest: the digest of the new one.
    # Either digest is this snapshot's until the switch ends (both manifests reference objects that exist).
    manifest_sha256_next: Mapped[str | None] = mapped_column(String(64))


class StoreObject(Base):
    """An object of a machine's chunk store (format 2): a block `chunks/<raw sha256>` or a pack
    `packs/<sha256>`, key relative to the machine prefix. `deleting`: gc found it unreferenced and is
    removing it; nothing may reuse it (a snapshot waits for gc to finish it, see src/jobs/gc.py)."""

    __tablename__ = "store_objects"
    __table_args__ = (PrimaryKeyConstraint("machine_id", "key"),)

    machine_id: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # block | pack
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="live")  # live | deleting
    gc_job_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class StoreChunk(Base):
    """Where a chunk (by the SHA-256 of its raw bytes) is stored in a machine's chunk store: what the
    control plane tells the host it need not upload again (`known_chunks`)."""

    __tablename__ = "store_chunks"
    __table_args__ = (
        PrimaryKeyConstraint("machine_id", "raw_sha256", "object_key"),
        Index("ix_store_chunks_object", "machine_id", "object_key"),
    )

    machine_id: Mapped[str] = mapped_column(String(128))
    raw_sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(128))
    offset: Mapped[int] = mapped_column(BigInteger)
    stored_size: Mapped[int] = mapped_column(BigInteger)
    raw_size: Mapped[int] = mapped_column(BigInteger)
    codec: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored bytes


class SnapshotObject(Base):
    """An object of the chunk store that a snapshot's manifest references. gc never deletes an object
    that any snapshot row references (whatever its status): the rows go with the snapshot record."""

    __tablename__ = "snapshot_objects"
    __table_args__ = (
        PrimaryKeyConstraint("snapshot_id", "object_key"),
        Index("ix_snapshot_objects_machine_key", "machine_id", "object_key"),
    )

    snapshot_id: Mapped[str] = mapped_column(String(64))
    machine_id: Mapped[str] = mapped_column(String(128))
    object_key: Mapped[str] = mapped_column(String(128))


class Job(Base):
    """A long operation. The queue carries only the id; this row is the source of truth."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    phase: Mapped[str | None] = mapped_column(String(64))
    bytes_done: Mapped[int | None] = mapped_column(BigInteger)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    parts_done: Mapped[int | None] = mapped_column(Integer)
    parts_total: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # steps done, for safe re-runs
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    machine_id: Mapped[str | None] = mapped_column(String(128), index=True)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # `machine:<id>` or `snapshot:<id>` while queued or running, NULL once finished: the unique index
    # makes "one active operation per machine" a database guarantee, not a race between requests.
    lock_key: Mapped[str | None] = mapped_column(String(160), unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()


class ApiToken(Base):
    """A bearer token made with `gpusnap tokens create`. Only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column()


class Event(Base):
    """One entry of the live event stream (`GET /api/events`): job status, phase and progress changes and
    machine events, in one sequence. The id is the SSE `id:`: a client that reconnects with
    `Last-Event-ID` gets what followed it, from whichever API process it reaches."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_kind_id", "job_id", "kind", "id"),)

    # BIGINT on PostgreSQL; INTEGER on SQLite, where only an INTEGER PRIMARY KEY is the autoincrementing rowid.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    machine_id: Mapped[str | None] = mapped_column(String(128), index=True)
    job_id: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class StreamToken(Base):
    """A short-lived token (`POST /api/stream-tokens`) that may only open `GET /api/events`: a browser's
    EventSource cannot send `Authorization`, and an API token must not travel in a URL. Only its SHA-256
    is stored; every API process can check it."""

    __tablename__ = "stream_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class MachinePolicy(Base):
    """What the worker does to a machine by itself (`PUT /api/instances/<id>/policy`): scheduled
    snapshots, retention, idle auto-hibernate. `spec` is the validated request body."""

    __tablename__ = "machine_policies"

    machine_id: Mapped[str] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Schedule slots at or before this instant never run: a new or changed schedule starts from now, not
    # from a slot in the past.
    schedule_from: Mapped[dt.datetime | None] = mapped_column()
    # The next idle sample is due at this instant; moved forward by the worker that takes the sample (a
    # conditional UPDATE), so two workers never sample one machine for the same interval.
    next_sample_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ScheduleSlot(Base):
    """One schedule slot of one machine, claimed by the worker that runs it: the primary key makes "a slot
    runs once, whatever the number of workers" a database guarantee."""

    __tablename__ = "schedule_slots"

    machine_id: Mapped[str] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    slot_at: Mapped[dt.datetime] = mapped_column(primary_key=True)
    outcome: Mapped[str] = mapped_column(String(32), default="claimed")  # started | skipped
    job_id: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class IdleSample(Base):
    """One idle probe of a machine: GPU utilisation per GPU and interactive SSH sessions, or the reason
    the probe failed (which counts as busy)."""

    __tablename__ = "idle_samples"
    __table_args__ = (Index("ix_idle_samples_machine_at", "machine_id", "taken_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine_id: Mapped[str] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"))
    taken_at: Mapped[dt.datetime] = mapped_column()
    ok: Mapped[bool] = mapped_column(Boolean)
    gpu_util: Mapped[list[int] | None] = mapped_column(JSON)
    ssh_sessions: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
