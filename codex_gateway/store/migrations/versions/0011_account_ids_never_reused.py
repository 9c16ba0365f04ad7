"""An upstream account's id is never given to another: on SQLite the table is built anew with
AUTOINCREMENT, so that an account added after one was removed cannot take its id, and a bill
written later for a request the removed one served (`account_removed`) or spooled before the
removal cannot name the new one. PostgreSQL's sequences never hand an id out twice.

The counter starts above the highest id the table holds then: an account removed before this
migration, with an id above every account left, may see its id given once more. A later
migration that builds this table anew must pass `table_kwargs={"sqlite_autoincrement": True}`
again, or the table loses AUTOINCREMENT and its counter.

A downgrade leaves the table as it is: older versions read and write it the same.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "upstream_accounts", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
    dangling = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if dangling:
        raise RuntimeError(
            "rows refer to rows that are not there (table, row id, referred table, key): "
            f"{dangling[:5]}; remove or mend them, then migrate again"
        )


def downgrade() -> None:
    """Nothing to undo: AUTOINCREMENT changes no column an older version reads or writes."""
