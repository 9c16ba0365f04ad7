"""Upstream API keys sealed at rest: `api_key_sealed` holds the key sealed with the
operator's secret key, and `api_key` is then "". Rows with the key in clear stay as they are
until `accounts seal` seals them.

A downgrade is refused while any key is sealed: the older version would send an empty key.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("api_key_sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    accounts = sa.table(
        "upstream_accounts", sa.column("name", sa.String()), sa.column("api_key_sealed", sa.Text())
    )
    query = sa.select(accounts.c.name).where(accounts.c.api_key_sealed.is_not(None))
    sealed = list(op.get_bind().execute(query.order_by(accounts.c.name)).scalars())
    if sealed:
        raise RuntimeError(
            f"the API keys of upstream accounts {', '.join(sealed)} are sealed, and a version "
            "before 0010 cannot open them: give each its key in clear again (`accounts add "
            "--replace` without a secret key), or remove them, before downgrading"
        )
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.drop_column("api_key_sealed")
