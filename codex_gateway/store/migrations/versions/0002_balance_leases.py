"""Balance leases: the part of each balance that gateway processes have set aside.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import codex_gateway.store.types

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reserved",
                codex_gateway.store.types.Money(),
                nullable=False,
                server_default="0",
            )
        )
    op.create_table(
        "balance_leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=100), nullable=False),
        sa.Column("amount", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("renewed_at", codex_gateway.store.types.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "holder"),
    )
    with op.batch_alter_table("balance_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_balance_leases_holder"), ["holder"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("balance_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_balance_leases_holder"))
    op.drop_table("balance_leases")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("reserved")
