"""ChatGPT accounts: sealed tokens, account id, token expiry, state and quota windows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 16:20:00.000000
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

import codex_gateway.store.types

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS: list[tuple[str, sa.types.TypeEngine[Any]]] = [
    ("chatgpt_account_id", sa.String(length=200)),
    ("access_token_sealed", sa.Text()),
    ("refresh_token_sealed", sa.Text()),
    ("id_token_sealed", sa.Text()),
    ("token_expires_at", codex_gateway.store.types.UTCDateTime()),
    ("last_refresh_at", codex_gateway.store.types.UTCDateTime()),
    ("state_reason", sa.Text()),
    ("quota", sa.Text()),
]


def upgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
        batch_op.add_column(
            sa.Column("state", sa.String(length=20), nullable=False, server_default="ready")
        )


def downgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.drop_column("state")
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
