"""machine policies: scheduled snapshots, retention, idle auto-hibernate

Revision ID: 0003_policies
Revises: 0002_events
Create Date: 2026-12-01 15:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_policies"
down_revision = "0002_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machine_policies",
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("schedule_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_sample_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("machine_id"),
    )
    op.create_table(
        "schedule_slots",
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("slot_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("machine_id", "slot_at"),
    )
    op.create_table(
        "idle_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("gpu_util", sa.JSON(), nullable=True),
        sa.Column("ssh_sessions", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("idle_samples", schema=None) as batch_op:
        batch_op.create_index("ix_idle_samples_machine_at", ["machine_id", "taken_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("idle_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_idle_samples_machine_at")
    op.drop_table("idle_samples")
    op.drop_table("schedule_slots")
    op.drop_table("machine_policies")
