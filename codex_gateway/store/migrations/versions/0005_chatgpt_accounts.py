"""ChatGPT accounts: sealed tokens, account id, token expiry and quota windows.

Their state (ready, needs_relogin, ...) is the account pool's `state` column (0004).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 16:20:00.000000
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

import codex_gateway.store.types

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS: list[tuple[str, sa.types.TypeEngine[Any]]] = [
    ("chatgpt_account_id", sa.String(length=200)),
    ("access_token_sealed", sa.Text()),
    ("refresh_token_sealed", sa.Text()),
    ("id_token_sealed", sa.Text()),
    ("token_expires_at", codex_gateway.store.types.UTCDateTime()),
    ("last_refresh_at", codex_gateway.store.types.UTCDateTime()),
    ("quota", sa.Text()),
]


def upgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
