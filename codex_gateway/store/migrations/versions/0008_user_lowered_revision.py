"""Users remember the revision at which a correction last lowered their balance.

Gateway processes compare it with the revision they last loaded, so a negative adjustment or a
refund reversal makes them hand back that user's unused leases at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lowered_at_revision", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("lowered_at_revision")
