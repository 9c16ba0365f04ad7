"""Reservations in the ledger, `charge` renamed `settle`, and key limits.

Every ledger entry now says how it moved the user's reserved amount as well as the balance,
so both can be recomputed from the ledger. Leases are granted and returned as `hold` and
`release` entries naming the lease; a request is settled by one `settle` entry (what used to
be `charge`). What was reserved when this migration ran, and requests that cost nothing and so
had no entry, get one opening entry each, noted as such.

Keys get an optional USD cap (with what they spent and what processes set aside against it),
an expiry time and a model allowlist; `key_leases` are the per-process slices of a cap.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

import codex_gateway.store.types

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

MIGRATION_NOTE = "opening entry written by migration 0007"


def upgrade() -> None:
    money = codex_gateway.store.types.Money
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reserved_change", money(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("lease_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cap_usd", money(), nullable=True))
        batch_op.add_column(sa.Column("spent_usd", money(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("reserved_usd", money(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("expires_at", codex_gateway.store.types.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(sa.Column("models", sa.Text(), nullable=True))
    op.create_table(
        "key_leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=100), nullable=False),
        sa.Column("amount", money(), nullable=False),
        sa.Column("renewed_at", codex_gateway.store.types.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_id", "holder"),
    )
    with op.batch_alter_table("key_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_key_leases_holder"), ["holder"], unique=False)
    _carry_over_data()


def _carry_over_data() -> None:
    """Rename charges, and open the ledger's record of reservations and free requests.

    Sums are taken in Python: on SQLite money is text, which SQL arithmetic would round.
    """
    bind = op.get_bind()
    op.execute("UPDATE ledger_entries SET kind = 'settle' WHERE kind = 'charge'")
    spent: dict[int, Decimal] = {}
    for key_id, cost in bind.execute(
        sa.text("SELECT key_id, cost_usd FROM usage_records WHERE key_id IS NOT NULL")
    ):
        spent[key_id] = spent.get(key_id, Decimal(0)) + Decimal(str(cost))
    for key_id, total in spent.items():
        bind.execute(
            sa.text("UPDATE api_keys SET spent_usd = :spent WHERE id = :id"),
            {"spent": _money(bind, total), "id": key_id},
        )
    users = bind.execute(sa.text("SELECT id, balance, reserved FROM users")).all()
    now = datetime.now(UTC)
    for user_id, balance, reserved in users:
        if Decimal(str(reserved)) != 0:
            _entry(bind, user_id, "hold", balance, reserved, None, "reserved by leases", now)
    free = bind.execute(
        sa.text(
            "SELECT u.request_id, u.user_id, u.started_at FROM usage_records u"
            " WHERE u.user_id IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM ledger_entries l WHERE l.request_id = u.request_id)"
        )
    ).all()
    balances = {user_id: balance for user_id, balance, _ in users}
    for request_id, user_id, _started in free:
        _entry(bind, user_id, "settle", balances[user_id], 0, request_id, "cost nothing", now)


def _entry(
    bind: sa.Connection,
    user_id: int,
    kind: str,
    balance: object,
    reserved: object,
    request_id: str | None,
    note: str,
    at: datetime,
) -> None:
    bind.execute(
        sa.text(
            "INSERT INTO ledger_entries (user_id, kind, amount, balance_after, reserved_change,"
            " request_id, note, created_at) VALUES (:user_id, :kind, :amount, :balance,"
            " :reserved, :request_id, :note, :at)"
        ),
        {
            "user_id": user_id,
            "kind": kind,
            "amount": _money(bind, Decimal(0)),
            "balance": _money(bind, Decimal(str(balance))),
            "reserved": _money(bind, Decimal(str(reserved))),
            "request_id": request_id,
            "note": f"{MIGRATION_NOTE}: {note}",
            "at": at if bind.dialect.name != "sqlite" else at.replace(tzinfo=None).isoformat(" "),
        },
    )


def _money(bind: sa.Connection, value: Decimal) -> object:
    return format(value, "f") if bind.dialect.name == "sqlite" else value


def downgrade() -> None:
    op.execute(f"DELETE FROM ledger_entries WHERE note LIKE '{MIGRATION_NOTE}%'")
    op.execute("DELETE FROM ledger_entries WHERE kind IN ('hold', 'release')")
    op.execute("UPDATE ledger_entries SET kind = 'charge' WHERE kind = 'settle'")
    with op.batch_alter_table("key_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_leases_holder"))
    op.drop_table("key_leases")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("models")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("reserved_usd")
        batch_op.drop_column("spent_usd")
        batch_op.drop_column("cap_usd")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("lease_id")
        batch_op.drop_column("reserved_change")
