"""Ledger corrections: who made an entry, and which request a refund concerns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("operator", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("refers_to", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_refers_to"), ["refers_to"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_refers_to"))
        batch_op.drop_column("refers_to")
        batch_op.drop_column("operator")
