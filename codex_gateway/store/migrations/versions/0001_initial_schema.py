"""Initial schema, seeded with list prices for the Codex family (USD per 1M tokens).

Revision ID: 0001
Revises:
Create Date: 2026-12-04 16:00:27.042734
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

import codex_gateway.store.types

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


SEED_PRICES = [
    ("gpt-5.1-codex", "1.25", "0.125", "10"),
    ("gpt-5.1-codex-mini", "0.25", "0.025", "2"),
    ("gpt-5.1-codex-max", "1.25", "0.125", "10"),
    ("gpt-5-codex", "1.25", "0.125", "10"),
    ("gpt-5.1", "1.25", "0.125", "10"),
    ("gpt-5", "1.25", "0.125", "10"),
    ("gpt-5-mini", "0.25", "0.025", "2"),
    ("gpt-5.2", "1.75", "0.175", "14"),
    ("gpt-5.2-codex", "1.75", "0.175", "14"),
]


def _seed() -> None:
    now = datetime.now(UTC)
    pricings = sa.table(
        "model_pricings",
        sa.column("model", sa.String),
        sa.column("input_per_million", codex_gateway.store.types.Money()),
        sa.column("cached_input_per_million", codex_gateway.store.types.Money()),
        sa.column("output_per_million", codex_gateway.store.types.Money()),
        sa.column("markup", codex_gateway.store.types.Money()),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(
        pricings,
        [
            {
                "model": model,
                "input_per_million": Decimal(input_),
                "cached_input_per_million": Decimal(cached),
                "output_per_million": Decimal(output),
                "markup": Decimal(1),
                "updated_at": now,
            }
            for model, input_, cached, output in SEED_PRICES
        ],
    )
    revision_table = sa.table(
        "revision", sa.column("id", sa.Integer), sa.column("value", sa.BigInteger)
    )
    op.bulk_insert(revision_table, [{"id": 1, "value": 1}])


def upgrade() -> None:
    op.create_table(
        "model_pricings",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("input_per_million", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("cached_input_per_million", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("output_per_million", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("markup", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "upstream_accounts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("api_key", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("balance", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("display", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_user_id"), ["user_id"], unique=False)

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("amount", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("balance_after", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_entries_user_id"), ["user_id"], unique=False)

    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("account_id", sa.Integer(), nullable=True),
        sa.Column("endpoint", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("upstream_model", sa.String(length=200), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=40), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_id", sa.String(length=200), nullable=True),
        sa.Column("raw_usage", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("uncached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("price_model", sa.String(length=200), nullable=True),
        sa.Column("price_input", codex_gateway.store.types.Money(), nullable=True),
        sa.Column("price_cached_input", codex_gateway.store.types.Money(), nullable=True),
        sa.Column("price_output", codex_gateway.store.types.Money(), nullable=True),
        sa.Column("markup", codex_gateway.store.types.Money(), nullable=True),
        sa.Column("cost_uncached_input", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("cost_cached_input", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("cost_output", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("cost_before_markup", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("cost_usd", codex_gateway.store.types.Money(), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("duration_ms", sa.Double(), nullable=False),
        sa.Column("ttfb_ms", sa.Double(), nullable=True),
        sa.Column("client_bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["upstream_accounts.id"],
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("request_id"),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_usage_records_started_at"), ["started_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_usage_records_user_id"), ["user_id"], unique=False)

    _seed()


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_records_user_id"))
        batch_op.drop_index(batch_op.f("ix_usage_records_started_at"))

    op.drop_table("usage_records")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_user_id"))

    op.drop_table("ledger_entries")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id"))

    op.drop_table("api_keys")
    op.drop_table("users")
    op.drop_table("upstream_accounts")
    op.drop_table("revision")
    op.drop_table("model_pricings")
