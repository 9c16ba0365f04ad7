"""Account pool: per-account concurrency cap, weight and health state; attempts per request.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_concurrency", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("weight", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch_op.add_column(
            sa.Column("state", sa.String(length=40), nullable=False, server_default="ready")
        )
        batch_op.add_column(sa.Column("state_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("state_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("attempts")
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.drop_column("state_until")
        batch_op.drop_column("state_reason")
        batch_op.drop_column("state")
        batch_op.drop_column("weight")
        batch_op.drop_column("max_concurrency")
