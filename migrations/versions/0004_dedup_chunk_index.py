"""dedup chunk index: snapshot format and counters, the machines' chunk stores and what references them

Revision ID: 0004_dedup
Revises: 0003_policies
Create Date: 2026-12-01 15:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_dedup"
down_revision = "0003_policies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        # Every snapshot before this migration is format 1.
        batch_op.add_column(sa.Column("format", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("chunks_new", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("chunks_reused", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("bytes_uploaded", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("manifest_sha256_next", sa.String(length=64), nullable=True))

    op.create_table(
        "store_objects",
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("gc_job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("machine_id", "key"),
    )
    op.create_table(
        "store_chunks",
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("object_key", sa.String(length=128), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("raw_size", sa.BigInteger(), nullable=False),
        sa.Column("codec", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("machine_id", "raw_sha256", "object_key"),
    )
    with op.batch_alter_table("store_chunks", schema=None) as batch_op:
        batch_op.create_index("ix_store_chunks_object", ["machine_id", "object_key"], unique=False)
    op.create_table(
        "snapshot_objects",
        sa.Column("snapshot_id", sa.String(length=64), nullable=False),
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("object_key", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("snapshot_id", "object_key"),
    )
    with op.batch_alter_table("snapshot_objects", schema=None) as batch_op:
        batch_op.create_index("ix_snapshot_objects_machine_key", ["machine_id", "object_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("snapshot_objects", schema=None) as batch_op:
        batch_op.drop_index("ix_snapshot_objects_machine_key")
    op.drop_table("snapshot_objects")
    with op.batch_alter_table("store_chunks", schema=None) as batch_op:
        batch_op.drop_index("ix_store_chunks_object")
    op.drop_table("store_chunks")
    op.drop_table("store_objects")
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.drop_column("manifest_sha256_next")
        batch_op.drop_column("bytes_uploaded")
        batch_op.drop_column("chunks_reused")
        batch_op.drop_column("chunks_new")
        batch_op.drop_column("format")
