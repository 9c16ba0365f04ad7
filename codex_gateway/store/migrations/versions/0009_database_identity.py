"""Each database gets a random identity of its own.

Hold journals and spooled usage rows name the database they belong to by it, so that gateways
of different databases sharing a folder never settle each other's bills, however each reaches
its database. A downgrade keeps the table, and an upgrade after it keeps the identity.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 07:00:00
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("database_identity"):
        op.create_table("database_identity", sa.Column("id", sa.String(32), primary_key=True))
    table = sa.table("database_identity", sa.column("id", sa.String(32)))
    if op.get_bind().execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0:
        op.bulk_insert(table, [{"id": uuid.uuid4().hex}])


def downgrade() -> None:
    """The identity stays: one made anew would leave the bills journaled and spooled under
    this one to no database."""
