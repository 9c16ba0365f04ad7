"""Keys whose billing is traced at run time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "billing_traces",
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("billing_traces")
