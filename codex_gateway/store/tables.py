"""The tables. Money columns are `Money` (exact); timestamps are UTC."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from codex_gateway.store.types import Money, UTCDateTime

# Ledger kinds that gateway processes write; operators write topup, refund and adjustment.
HOLD = "hold"
RELEASE = "release"
SETTLE = "settle"
# The status of a usage row for a request whose process died before its usage was recorded.
STATUS_INTERRUPTED = "interrupted"


class Base(DeclarativeBase):
    pass


class Revision(Base):
    """One row whose value goes up whenever users, keys, accounts or prices change."""

    __tablename__ = "revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


class DatabaseIdentity(Base):
    """One row: the random identity this database's migrations gave it, by which hold journals
    and spooled usage rows name it."""

    __tablename__ = "database_identity"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    balance: Mapped[Decimal] = mapped_column(Money, nullable=False)
    # The part of the balance set aside by gateway processes' leases (see BalanceLease).
    reserved: Mapped[Decimal] = mapped_column(Money, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # The revision of the last correction that lowered the balance: processes that see it
    # hand back this user's unused leases and lease again against the lower balance.
    lowered_at_revision: Mapped[int | None] = mapped_column(Integer, nullable=True)


class _Lease:
    """The columns every kind of lease has: which process holds how much, renewed when."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    holder: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class BalanceLease(_Lease, Base):
    """A slice of a user's balance that one gateway process may spend without asking again.

    Admission is checked against the lease in the process's memory; only taking a new slice
    touches the database. A lease whose holder stops renewing it is returned to the user.
    """

    __tablename__ = "balance_leases"
    __table_args__ = (UniqueConstraint("user_id", "holder"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    display: Mapped[str] = mapped_column(String(40), nullable=False)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Limits: spent plus what processes set aside (key_leases) never exceeds the cap.
    cap_usd: Mapped[Decimal | None] = mapped_column(Money)
    spent_usd: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    models: Mapped[str | None] = mapped_column(Text)  # JSON list of allowed models, or NULL


class KeyLease(_Lease, Base):
    """A slice of a capped key's remaining cap that one gateway process may spend locally.

    The same idea as BalanceLease, one level down: a request of a capped key is admitted
    against both its user's lease and its key's lease.
    """

    __tablename__ = "key_leases"
    __table_args__ = (UniqueConstraint("key_id", "holder"),)

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), nullable=False)


class UpstreamAccount(Base):
    __tablename__ = "upstream_accounts"
    # An id is never given to another account (migration 0011), so a bill written after its
    # account was removed cannot name a newer one. A migration that builds this table anew on
    # SQLite must keep it (`table_kwargs={"sqlite_autoincrement": True}`).
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    base_url: Mapped[str] = mapped_column(Text, nullable=False)
    # An API key in clear, or "" when it is sealed with the operator's secret key in
    # api_key_sealed (always so for a key added while the gateway had a secret key)
    api_key: Mapped[str] = mapped_column(Text, nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=100)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # Health as last marked by a gateway process: ready, cooling_down, quota_limited or
    # needs_relogin; cooling_down and quota_limited end by themselves at state_until.
    state: Mapped[str] = mapped_column(String(40), nullable=False, default="ready")
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # ChatGPT accounts: tokens sealed with the operator's secret key, never stored in clear
    chatgpt_account_id: Mapped[str | None] = mapped_column(String(200))
    access_token_sealed: Mapped[str | None] = mapped_column(Text)
    refresh_token_sealed: Mapped[str | None] = mapped_column(Text)
    id_token_sealed: Mapped[str | None] = mapped_column(Text)
    token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    quota: Mapped[str | None] = mapped_column(Text)  # the last quota windows seen, as JSON
    api_key_sealed: Mapped[str | None] = mapped_column(Text)


# Every column that holds a value sealed with the operator's secret key. An account's API key,
# or else its refresh token, comes first: `Store.sealed_values` takes the first one held.
SEALED_COLUMNS = (
    UpstreamAccount.api_key_sealed,
    UpstreamAccount.refresh_token_sealed,
    UpstreamAccount.access_token_sealed,
    UpstreamAccount.id_token_sealed,
)


class ModelPricing(Base):
    """USD per 1M tokens for input, cached input and output, and a markup on the sum."""

    __tablename__ = "model_pricings"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    input_per_million: Mapped[Decimal] = mapped_column(Money, nullable=False)
    cached_input_per_million: Mapped[Decimal] = mapped_column(Money, nullable=False)
    output_per_million: Mapped[Decimal] = mapped_column(Money, nullable=False)
    markup: Mapped[Decimal] = mapped_column(Money, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class LedgerEntry(Base):
    """Every change to a balance or to what is reserved of it.

    `amount` moves the balance and `reserved_change` the reserved part, so both can be
    recomputed from the ledger. Kinds: `topup`, `refund`, `adjustment` (operator actions);
    `hold` and `release` (a lease granted or returned, naming the lease; a `release` with a
    request id is a request that ended without a bill, such as one cut by a crash); `settle`
    (a request's cost, one per request id). Entries are only ever added; a mistake is
    corrected by another entry, never by an edit.
    """

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    balance_after: Mapped[Decimal] = mapped_column(Money, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # Corrections (refunds, adjustments) name the operator, and a refund the request it undoes.
    operator: Mapped[str | None] = mapped_column(String(200))
    refers_to: Mapped[str | None] = mapped_column(String(64), index=True)
    reserved_change: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    lease_id: Mapped[int | None] = mapped_column(Integer)


class UsageRecord(Base):
    """One row per request: what came back, how it was counted, priced and charged."""

    __tablename__ = "usage_records"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("upstream_accounts.id"))
    endpoint: Mapped[str] = mapped_column(String(40), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    upstream_model: Mapped[str | None] = mapped_column(String(200))
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    status: Mapped[str] = mapped_column(String(40), nullable=False)
    http_status: Mapped[int] = mapped_column(Integer, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    response_id: Mapped[str | None] = mapped_column(String(200))
    raw_usage: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    uncached_input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    price_model: Mapped[str | None] = mapped_column(String(200))
    price_input: Mapped[Decimal | None] = mapped_column(Money)
    price_cached_input: Mapped[Decimal | None] = mapped_column(Money)
    price_output: Mapped[Decimal | None] = mapped_column(Money)
    markup: Mapped[Decimal | None] = mapped_column(Money)
    cost_uncached_input: Mapped[Decimal] = mapped_column(Money, nullable=False)
    cost_cached_input: Mapped[Decimal] = mapped_column(Money, nullable=False)
    cost_output: Mapped[Decimal] = mapped_column(Money, nullable=False)
    cost_before_markup: Mapped[Decimal] = mapped_column(Money, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(Money, nullable=False)
    flags: Mapped[str] = mapped_column(Text, nullable=False)
    duration_ms: Mapped[float] = mapped_column(nullable=False)
    ttfb_ms: Mapped[float | None] = mapped_column()
    client_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Each try at an upstream account: account, outcome, error kind, milliseconds (JSON).
    attempts: Mapped[str | None] = mapped_column(Text)


class BillingTrace(Base):
    """Keys whose bills every process logs in four stages at INFO, switched on at run time."""

    __tablename__ = "billing_traces"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
