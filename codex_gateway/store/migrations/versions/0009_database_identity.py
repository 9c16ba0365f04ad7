"""Each database gets a random identity of its own.

Hold journals and spooled usage rows name the database they belong to by it, so that gateways
of different databases sharing a folder never settle each other's bills, however each reaches
its database.

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
    table = op.create_table("database_identity", sa.Column("id", sa.String(32), primary_key=True))
    op.bulk_insert(table, [{"id": uuid.uuid4().hex}])


def downgrade() -> None:
    op.drop_table("database_identity")
