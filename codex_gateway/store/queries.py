"""Every statement the gateway and its CLI run, behind one `Store` object."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Select, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codex_gateway.billing.pricing import MONEY, ZERO, Price, plain
from codex_gateway.billing.settlement import FLAG_ACCOUNT_REMOVED
from codex_gateway.store.audit import Snapshot, ledger_problems
from codex_gateway.store.bulk import BulkInsert
from codex_gateway.store.db import READ_ONLY
from codex_gateway.store.direct import DriverStatement
from codex_gateway.store.tables import (
    HOLD,
    RELEASE,
    SEALED_COLUMNS,
    SETTLE,
    STATUS_INTERRUPTED,
    ApiKey,
    BalanceLease,
    BillingTrace,
    DatabaseIdentity,
    KeyLease,
    LedgerEntry,
    ModelPricing,
    Revision,
    UpstreamAccount,
    UsageRecord,
    User,
)

KEY_PREFIX = "sk-cg-"


class StoreError(Exception):
    """An operator asked for something the data does not allow; the message says what."""


@dataclass(frozen=True)
class KeyRecord:
    id: int
    user_id: int
    user_name: str
    display: str
    revoked: bool
    cap: Decimal | None = None
    expires_at: datetime | None = None
    models: frozenset[str] | None = None
    # What the key had spent when the catalog loaded it; admission adds its own holds.
    spent: Decimal = ZERO

    def limits(self) -> tuple[Decimal | None, datetime | None, bool]:
        """What, when it changes, makes processes hand back the key's lease."""
        return self.cap, self.expires_at, self.revoked


@dataclass(frozen=True)
class Corrected:
    """A user's balance after a correction, and how much of it processes hold in leases."""

    balance: Decimal
    reserved: Decimal


@dataclass(frozen=True)
class KeyLimits:
    """A key's optional limits; `models` None allows every priced model."""

    cap: Decimal | None = None
    expires_at: datetime | None = None
    models: tuple[str, ...] | None = None

    def values(self) -> dict[str, Any]:
        models = orjson.dumps(list(self.models)).decode() if self.models is not None else None
        return {"cap_usd": self.cap, "expires_at": self.expires_at, "models": models}


_KEY_COLUMNS = (
    ApiKey.id,
    ApiKey.user_id,
    User.name,
    ApiKey.display,
    ApiKey.revoked_at,
    ApiKey.cap_usd,
    ApiKey.expires_at,
    ApiKey.models,
    ApiKey.spent_usd,
)


def _key_record(row: Sequence[Any]) -> KeyRecord:
    models = frozenset(orjson.loads(row[7])) if row[7] is not None else None
    spent = Decimal(str(row[8])) if row[8] is not None else ZERO
    return KeyRecord(
        row[0], row[1], row[2], row[3], row[4] is not None, row[5], row[6], models, spent
    )


@dataclass(frozen=True)
class Settled:
    """What settling one usage row did: the new balance (None if untouched) and how much of
    the cost came out of the settling process's lease on the user, and on the key's cap."""

    request_id: str
    user_id: int | None
    balance: Decimal | None
    consumed: Decimal = ZERO
    key_consumed: Decimal = ZERO


def _balance(row: Sequence[Any]) -> Decimal:
    return Decimal(str(row[0]))


def _cap_left(row: Sequence[Any]) -> Decimal:
    cap, spent = row[0], row[1]
    return ZERO if cap is None else MONEY.subtract(Decimal(str(cap)), Decimal(str(spent)))


@dataclass(frozen=True)
class LeaseScope:
    """One kind of lease: whose money it sets aside, and where the slices are kept.

    `limit_columns` are read from the owner's row and `headroom` makes of them what the owner
    may spend in all; what is reserved is kept in the owner's `reserved` column.
    """

    name: str
    owner: Any
    owner_id: Any
    reserved: Any
    limit_columns: tuple[Any, ...]
    headroom: Callable[[Sequence[Any]], Decimal]
    lease: Any
    lease_owner: Any
    ledger: bool

    def limit(self, row: Sequence[Any]) -> Decimal:
        return self.headroom(row)


USER_LEASES = LeaseScope(
    "user", User, User.id, User.reserved, (User.balance,), _balance,
    BalanceLease, BalanceLease.user_id, ledger=True,
)  # fmt: skip
KEY_LEASES = LeaseScope(
    "key", ApiKey, ApiKey.id, ApiKey.reserved_usd, (ApiKey.cap_usd, ApiKey.spent_usd),
    _cap_left, KeyLease, KeyLease.key_id, ledger=False,
)  # fmt: skip
SCOPES = (USER_LEASES, KEY_LEASES)


@dataclass(frozen=True)
class ScopeStatements:
    """The statements on a scope's owners and leases that settling runs for every batch
    (and leasing now and then), each run by asyncpg itself on PostgreSQL once a transaction
    is open (`store/direct.py`)."""

    lock_owner: DriverStatement
    lock_lease: DriverStatement
    write_owner: DriverStatement  # the owner's columns settlement changes
    write_lease: DriverStatement

    @classmethod
    def of(cls, scope: LeaseScope, settled: tuple[Any, ...]) -> ScopeStatements:
        owner: Any = bindparam("owner")
        return cls(
            DriverStatement(
                select(*scope.limit_columns, scope.reserved)
                .where(scope.owner_id == owner)
                .with_for_update()
            ),
            DriverStatement(
                select(scope.lease.id, scope.lease.amount)
                .where(scope.lease_owner == owner, scope.lease.holder == bindparam("holder"))
                .with_for_update()
            ),
            DriverStatement(
                update(scope.owner)
                .where(scope.owner_id == owner)
                .values({column.key: bindparam(f"new_{column.key}") for column in settled})
            ),
            DriverStatement(
                update(scope.lease)
                .where(scope.lease.id == bindparam("lease"))
                .values(amount=bindparam("new_amount"))
            ),
        )


STATEMENTS = {
    USER_LEASES.name: ScopeStatements.of(USER_LEASES, (User.balance, User.reserved)),
    KEY_LEASES.name: ScopeStatements.of(KEY_LEASES, (ApiKey.spent_usd, ApiKey.reserved_usd)),
}
# Asks a release for the whole lease, whatever it holds.
EVERYTHING = Decimal(10) ** 30


@dataclass(frozen=True)
class AccountRecord:
    id: int
    name: str
    kind: str
    base_url: str
    api_key: str = field(repr=False)
    priority: int
    enabled: bool
    max_concurrency: int | None = None
    weight: int = 1
    state: str = "ready"
    state_reason: str | None = None
    state_until: datetime | None = None
    chatgpt_account_id: str | None = None  # the ChatGPT-Account-ID of a `chatgpt` account
    # The API key sealed with the operator's secret key; `api_key` is then "" until the
    # catalog opens it (upstream/sealing.py).
    api_key_sealed: str | None = field(default=None, repr=False)


# Sealed values by account name, then column.
SealedByAccount = dict[str, dict[str, str]]


@dataclass(frozen=True)
class Resealing:
    """What `Store.reseal` found sealed, and what it stored in its place."""

    held: SealedByAccount = field(repr=False)
    stored: SealedByAccount = field(repr=False)


def now() -> datetime:
    return datetime.now(UTC)


def _key_columns(api_key: str, sealed: bool) -> dict[str, str | None]:
    """The columns that hold an upstream API key: in clear, or sealed with "" in clear."""
    if sealed:
        return {"api_key": "", "api_key_sealed": api_key}
    return {"api_key": api_key, "api_key_sealed": None}


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh gateway key and the form it is shown in from then on."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    return raw, display_key(raw)


def display_key(raw: str) -> str:
    """A key as it may appear anywhere: its prefix and last four characters."""
    if len(raw) < 16:
        return "***"
    return f"{KEY_PREFIX}…{raw[-4:]}"


# What the usage writer puts in a ledger entry for each settled request.
SETTLEMENT_COLUMNS = (
    "user_id",
    "kind",
    "amount",
    "reserved_change",
    "balance_after",
    "request_id",
    "note",
    "lease_id",
    "created_at",
)


class Store:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        tables = UsageRecord.metadata.tables
        usage = tables[UsageRecord.__tablename__]
        self._usage_rows = BulkInsert(usage, usage.columns.keys(), engine.dialect)
        ledger = tables[LedgerEntry.__tablename__]
        self._settlements = BulkInsert(ledger, SETTLEMENT_COLUMNS, engine.dialect)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading: on SQLite it takes no write lock."""
        async with self.engine.connect() as conn:
            await conn.execution_options(**READ_ONLY)
            yield conn
            await conn.rollback()

    # -- revision: lets every process notice administrative changes --------------------------

    async def revision(self) -> int:
        async with self._read() as conn:
            value = await conn.scalar(select(Revision.value).where(Revision.id == 1))
        return int(value or 0)

    @staticmethod
    async def _bump(conn: AsyncConnection) -> int:
        """Move the revision on; returns the new one (committed with the transaction)."""
        await conn.execute(
            update(Revision).where(Revision.id == 1).values(value=Revision.value + 1)
        )
        return int(await conn.scalar(select(Revision.value).where(Revision.id == 1)) or 0)

    async def lowered_since(self, revision: int) -> set[int]:
        """Users whose balance a correction lowered after `revision`."""
        async with self._read() as conn:
            rows = await conn.scalars(select(User.id).where(User.lowered_at_revision > revision))
            return set(rows.all())

    # -- users -------------------------------------------------------------------------------

    async def create_user(self, name: str, balance: Decimal) -> None:
        async with self.engine.begin() as conn:
            try:
                result = await conn.execute(
                    insert(User)
                    .values(name=name, balance=balance, reserved=ZERO, created_at=now())
                    .returning(User.id)
                )
            except IntegrityError:
                raise StoreError(f"a user named {name!r} already exists") from None
            user_id: int = result.scalar_one()
            if balance:
                await self._ledger(
                    conn, user_id, "topup", balance, balance, None, "initial balance"
                )
            await self._bump(conn)

    async def topup(self, name: str, amount: Decimal, note: str | None = None) -> Decimal:
        async with self.engine.begin() as conn:
            user_id, balance = await self._user_for_update(conn, name)
            new_balance = MONEY.add(balance, amount)
            await conn.execute(update(User).where(User.id == user_id).values(balance=new_balance))
            await self._ledger(conn, user_id, "topup", amount, new_balance, None, note)
            await self._bump(conn)
        return new_balance

    async def correct(
        self,
        name: str,
        kind: str,
        amount: Decimal,
        reason: str,
        operator: str,
        refers_to: str | None = None,
    ) -> Corrected:
        """A refund or adjustment: a new ledger entry with its reason and operator.

        A refund that names a request must be that user's, and all refunds of one request
        together never exceed what it cost. A correction that lowers the balance marks the
        user with the new revision, so every process hands back its unused leases of the user
        and leases again against the lower balance.
        """
        async with self.engine.begin() as conn:
            user_id, balance = await self._user_for_update(conn, name)
            if refers_to is not None:
                await self._check_refund(conn, user_id, refers_to, amount)
            new_balance = MONEY.add(balance, amount)
            values: dict[str, Any] = {"balance": new_balance}
            if amount < 0:
                values["lowered_at_revision"] = await self._bump(conn)
            await conn.execute(update(User).where(User.id == user_id).values(values))
            await self._ledger(
                conn,
                user_id,
                kind,
                amount,
                new_balance,
                None,
                reason,
                operator=operator,
                refers_to=refers_to,
            )
            if amount >= 0:
                await self._bump(conn)
            reserved = await conn.scalar(select(User.reserved).where(User.id == user_id))
        return Corrected(new_balance, Decimal(str(reserved)))

    @staticmethod
    async def _check_refund(
        conn: AsyncConnection, user_id: int, request_id: str, amount: Decimal
    ) -> None:
        row = (
            await conn.execute(
                select(UsageRecord.user_id, UsageRecord.cost_usd).where(
                    UsageRecord.request_id == request_id
                )
            )
        ).first()
        if row is None or row[0] != user_id:
            raise StoreError(f"request {request_id!r} is not one of this user's requests")
        refunded = await conn.execute(
            select(LedgerEntry.amount).where(
                LedgerEntry.refers_to == request_id, LedgerEntry.kind == "refund"
            )
        )
        total = amount
        for (earlier,) in refunded:
            total = MONEY.add(total, Decimal(str(earlier)))
        if total > Decimal(str(row[1])):
            raise StoreError(
                f"refunds of {request_id} would come to {plain(total)}, more than its cost "
                f"{plain(Decimal(str(row[1])))}"
            )

    async def _user_for_update(self, conn: AsyncConnection, name: str) -> tuple[int, Decimal]:
        row = (
            await conn.execute(
                select(User.id, User.balance).where(User.name == name).with_for_update()
            )
        ).first()
        if row is None:
            raise StoreError(f"no user named {name!r}")
        return row[0], row[1]

    async def list_users(self) -> list[dict[str, Any]]:
        async with self._read() as conn:
            rows = (await conn.execute(select(User).order_by(User.id))).mappings().all()
        return [dict(row) for row in rows]

    async def balance(self, user_id: int) -> Decimal:
        async with self._read() as conn:
            value = await conn.scalar(select(User.balance).where(User.id == user_id))
        return value if value is not None else Decimal(0)

    async def balances(self) -> dict[int, Decimal]:
        async with self._read() as conn:
            rows = (await conn.execute(select(User.id, User.balance))).all()
        return {row[0]: row[1] for row in rows}

    # -- keys --------------------------------------------------------------------------------

    async def create_key(
        self, user_name: str, name: str | None = None, limits: KeyLimits | None = None
    ) -> tuple[str, str]:
        raw, display = new_key()
        async with self.engine.begin() as conn:
            user_id = await conn.scalar(select(User.id).where(User.name == user_name))
            if user_id is None:
                raise StoreError(f"no user named {user_name!r}")
            await conn.execute(
                insert(ApiKey).values(
                    user_id=user_id,
                    key_hash=hash_key(raw),
                    display=display,
                    name=name,
                    created_at=now(),
                    **(limits or KeyLimits()).values(),
                )
            )
            await self._bump(conn)
        return raw, display

    async def update_key(self, key_id: int, changes: dict[str, Any]) -> None:
        """Change a key's limits: `changes` holds the KeyLimits.values() entries to set."""
        async with self.engine.begin() as conn:
            result = await conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(changes))
            if result.rowcount == 0:
                raise StoreError(f"no key with id {key_id}")
            await self._bump(conn)

    async def list_keys(self, user_name: str | None = None) -> list[dict[str, Any]]:
        query = (
            select(
                ApiKey.id,
                ApiKey.display,
                ApiKey.name,
                User.name.label("user"),
                ApiKey.created_at,
                ApiKey.revoked_at,
                ApiKey.cap_usd.label("cap"),
                ApiKey.spent_usd.label("spent"),
                ApiKey.reserved_usd.label("held"),
                ApiKey.expires_at,
                ApiKey.models,
            )
            .join(User, User.id == ApiKey.user_id)
            .order_by(ApiKey.id)
        )
        if user_name is not None:
            query = query.where(User.name == user_name)
        async with self._read() as conn:
            if user_name is not None:
                await _require_user(conn, user_name)
            rows = (await conn.execute(query)).mappings().all()
        return [dict(row) for row in rows]

    async def revoke_key(self, key_id: int) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            if result.rowcount == 0:
                raise StoreError(f"no active key with id {key_id}")
            await self._bump(conn)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        query = (
            select(*_KEY_COLUMNS)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == key_hash)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return _key_record(row) if row is not None else None

    async def active_keys(self) -> dict[str, KeyRecord]:
        query = (
            select(ApiKey.key_hash, *_KEY_COLUMNS)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return {row[0]: _key_record(row[1:]) for row in rows}

    # -- upstream accounts -------------------------------------------------------------------

    async def add_account(
        self,
        name: str,
        kind: str,
        base_url: str,
        api_key: str,
        priority: int = 100,
        *,
        sealed: bool = False,
        max_concurrency: int | None = None,
        weight: int = 1,
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Add an account; `sealed`: `api_key` is sealed with the secret key; `extra` holds
        the columns of its kind (a ChatGPT account's)."""
        async with self.engine.begin() as conn:
            try:
                result = await conn.execute(
                    insert(UpstreamAccount)
                    .values(
                        name=name,
                        kind=kind,
                        base_url=base_url.rstrip("/"),
                        **_key_columns(api_key, sealed),
                        priority=priority,
                        enabled=True,
                        created_at=now(),
                        max_concurrency=max_concurrency,
                        weight=weight,
                        state="ready",
                        **(extra or {}),
                    )
                    .returning(UpstreamAccount.id)
                )
            except IntegrityError:
                raise StoreError(f"an account named {name!r} already exists") from None
            account_id: int = result.scalar_one()
            await self._bump(conn)
        return account_id

    async def set_account_enabled(
        self,
        name: str,
        enabled: bool,
        lift_walls: Callable[[str], str | None] | None = None,
    ) -> None:
        """Enabling also clears a health mark: the operator says the account is fixed.

        A usage wall is also kept in the stored quota, which a restarting gateway reads
        again; `lift_walls` rewrites that document, in the same transaction, so the
        operator's word outlasts a restart.
        """
        values: dict[str, Any] = {"enabled": enabled}
        if enabled:
            values.update(state="ready", state_reason=None, state_until=None)
        async with self.engine.begin() as conn:
            if enabled and lift_walls is not None:
                stored = await conn.scalar(
                    select(UpstreamAccount.quota)
                    .where(UpstreamAccount.name == name)
                    .with_for_update()
                )
                if stored:
                    values["quota"] = lift_walls(stored)
            result = await conn.execute(
                update(UpstreamAccount).where(UpstreamAccount.name == name).values(**values)
            )
            if result.rowcount == 0:
                raise StoreError(f"no account named {name!r}")
            await self._bump(conn)

    async def replace_api_key(
        self, name: str, kind: str, base_url: str, api_key: str, *, sealed: bool
    ) -> None:
        """A new key (and base URL) for an existing account of `kind`, which is then ready
        again: the operator has fixed what its old key lacked."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(UpstreamAccount)
                .where(UpstreamAccount.name == name, UpstreamAccount.kind == kind)
                .values(
                    base_url=base_url.rstrip("/"),
                    **_key_columns(api_key, sealed),
                    state="ready",
                    state_reason=None,
                    state_until=None,
                )
            )
            if result.rowcount == 0:
                raise StoreError(f"no {kind} account named {name!r} to replace")
            await self._bump(conn)

    async def seal_api_keys(
        self, kind: str, seal: Callable[[str], str], *, keep: tuple[str, str] | None = None
    ) -> list[str]:
        """Seal in place every API key of `kind` still stored in clear, but for the account
        and key `keep` (a placeholder that is no secret); the names of the accounts sealed.
        A row another process sealed meanwhile is left as it is."""
        in_clear = (
            select(UpstreamAccount.id, UpstreamAccount.name, UpstreamAccount.api_key)
            .where(UpstreamAccount.kind == kind, UpstreamAccount.api_key_sealed.is_(None))
            .order_by(UpstreamAccount.id)
        )
        sealed: list[str] = []
        async with self.engine.begin() as conn:
            for account_id, name, api_key in (await conn.execute(in_clear)).all():
                if (name, api_key) == keep:
                    continue
                result = await conn.execute(
                    update(UpstreamAccount)
                    .where(
                        UpstreamAccount.id == account_id,
                        UpstreamAccount.api_key_sealed.is_(None),
                        UpstreamAccount.api_key == api_key,
                    )
                    .values(**_key_columns(seal(api_key), sealed=True))
                )
                if result.rowcount:
                    sealed.append(name)
            if sealed:
                await self._bump(conn)
        return sealed

    async def sealed_values(self, *, besides: str | None = None) -> dict[str, str]:
        """One value each account holds sealed with the secret key (its API key, or a
        ChatGPT token), by account name; `besides` names an account to leave out."""
        value = func.coalesce(*SEALED_COLUMNS)
        query = select(UpstreamAccount.name, value).where(value.is_not(None))
        if besides is not None:
            query = query.where(UpstreamAccount.name != besides)
        async with self._read() as conn:
            rows = (await conn.execute(query.order_by(UpstreamAccount.id))).all()
        return {name: sealed for name, sealed in rows}

    async def reseal(self, change: Callable[[SealedByAccount], SealedByAccount]) -> Resealing:
        """Give every value sealed with the secret key to `change` and store what it gives
        back in place of those values, in one transaction holding the rows, so a token
        refresh meanwhile waits for it. What `change` raises leaves every value as it was;
        the revision goes up only if something was stored."""
        query = select(UpstreamAccount.id, UpstreamAccount.name, *SEALED_COLUMNS)
        async with self.engine.begin() as conn:
            held: SealedByAccount = {}
            ids: dict[str, int] = {}
            rows = await conn.execute(query.order_by(UpstreamAccount.id).with_for_update())
            for account_id, name, *values in rows.all():
                pairs = zip(SEALED_COLUMNS, values, strict=True)
                sealed = {column.key: value for column, value in pairs if value is not None}
                if sealed:
                    held[name], ids[name] = sealed, account_id
            changed = change(held)
            for name, sealed_anew in changed.items():
                await conn.execute(
                    update(UpstreamAccount)
                    .where(UpstreamAccount.id == ids[name])
                    .values(**sealed_anew)
                )
            if changed:
                await self._bump(conn)
        return Resealing(held, changed)

    async def set_account_base_url(self, name: str, base_url: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(UpstreamAccount)
                .where(UpstreamAccount.name == name)
                .values(base_url=base_url.rstrip("/"))
            )
            if result.rowcount == 0:
                raise StoreError(f"no account named {name!r}")
            await self._bump(conn)

    async def remove_account(self, name: str) -> None:
        async with self.engine.begin() as conn:
            served = await conn.scalar(
                select(func.count())
                .select_from(UsageRecord)
                .join(UpstreamAccount, UpstreamAccount.id == UsageRecord.account_id)
                .where(UpstreamAccount.name == name)
            )
            if served:
                raise StoreError(
                    f"account {name!r} has served {served} requests that its usage rows name; "
                    "disable it instead"
                )
            try:
                result = await conn.execute(
                    delete(UpstreamAccount).where(UpstreamAccount.name == name)
                )
            except IntegrityError:
                # A bill naming it was written between the count and the delete.
                raise StoreError(
                    f"account {name!r} has just served a request that its usage row names; "
                    "disable it instead"
                ) from None
            if result.rowcount == 0:
                raise StoreError(f"no account named {name!r}")
            await self._bump(conn)

    async def accounts(self) -> list[AccountRecord]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(
                        UpstreamAccount.id,
                        UpstreamAccount.name,
                        UpstreamAccount.kind,
                        UpstreamAccount.base_url,
                        UpstreamAccount.api_key,
                        UpstreamAccount.priority,
                        UpstreamAccount.enabled,
                        UpstreamAccount.max_concurrency,
                        UpstreamAccount.weight,
                        UpstreamAccount.state,
                        UpstreamAccount.state_reason,
                        UpstreamAccount.state_until,
                        UpstreamAccount.chatgpt_account_id,
                        UpstreamAccount.api_key_sealed,
                    ).order_by(UpstreamAccount.priority, UpstreamAccount.id)
                )
            ).all()
        return [AccountRecord(*row) for row in rows]

    async def mark_account(
        self, account_id: int, state: str, reason: str | None, until: datetime | None
    ) -> int:
        """Record an account's health so every process and `accounts list` see it.

        Returns the revision that carries the mark.
        """
        async with self.engine.begin() as conn:
            await conn.execute(
                update(UpstreamAccount)
                .where(UpstreamAccount.id == account_id)
                .values(state=state, state_reason=reason, state_until=until)
            )
            return await self._bump(conn)

    # -- prices ------------------------------------------------------------------------------

    async def set_price(self, price: Price) -> None:
        values = {
            "input_per_million": price.input,
            "cached_input_per_million": price.cached_input,
            "output_per_million": price.output,
            "markup": price.markup,
            "updated_at": now(),
        }
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(ModelPricing).where(ModelPricing.model == price.model).values(**values)
            )
            if result.rowcount == 0:
                await conn.execute(insert(ModelPricing).values(model=price.model, **values))
            await self._bump(conn)

    async def remove_price(self, model: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(ModelPricing).where(ModelPricing.model == model))
            if result.rowcount == 0:
                raise StoreError(f"no price for model {model!r}")
            await self._bump(conn)

    async def prices(self) -> list[Price]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(
                        ModelPricing.model,
                        ModelPricing.input_per_million,
                        ModelPricing.cached_input_per_million,
                        ModelPricing.output_per_million,
                        ModelPricing.markup,
                    ).order_by(ModelPricing.model)
                )
            ).all()
        return [Price(*row) for row in rows]

    # -- settlement --------------------------------------------------------------------------

    async def settle(self, record: dict[str, Any], holder: str | None = None) -> Decimal | None:
        """Write a usage row and debit its cost in one transaction; once per request id.

        Returns the user's new balance, or None when nothing was debited: no user, no cost, or
        a request id settled before (a repeat changes nothing).
        """
        return (await self._settle_alone(record, holder)).balance

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]:
        """Settle a batch in one transaction (one commit for many requests).

        If any request id was settled before, the batch is rolled back and each record is
        settled on its own, so a repeat still changes nothing.
        """
        try:
            async with self.engine.begin() as conn:
                return await self._settle_batch(conn, records, holder)
        except IntegrityError:
            pass
        return [await self._settle_alone(record, holder) for record in records]

    async def _settle_alone(self, record: dict[str, Any], holder: str | None) -> Settled:
        try:
            async with self.engine.begin() as conn:
                (settled,) = await self._settle_batch(conn, [record], holder)
                return settled
        except IntegrityError:
            if await self.usage(record["request_id"]) is not None:
                return Settled(record["request_id"], record.get("user_id"), None)
            account_id = record.get("account_id")
            if account_id is None or await self._account_exists(account_id):
                raise
        # The account was removed while it served the request (`remove_account` sees only
        # rows already written): the bill stands, without the id of an account that is gone.
        return await self._settle_alone(_without_account(record), holder)

    async def _account_exists(self, account_id: int) -> bool:
        """Whether the account is still there, read after the refused write rolled back."""
        async with self._read() as conn:
            found = await conn.scalar(
                select(UpstreamAccount.id).where(UpstreamAccount.id == account_id)
            )
        return found is not None

    async def _settle_batch(
        self, conn: AsyncConnection, records: list[dict[str, Any]], holder: str | None
    ) -> list[Settled]:
        """Debit each user once for all their costs, lease first; then insert the rows.

        Rows and ledger entries go in a few statements each (`BulkInsert`). Each user is locked,
        debited and has its lease reduced once; each key's spending is added up once. Users
        and keys are locked in id order, so two writers never wait on each other in a circle.
        """
        by_user: dict[int, list[dict[str, Any]]] = {}
        by_key: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            if record.get("user_id") is not None:
                by_user.setdefault(record["user_id"], []).append(record)
            if record.get("key_id") is not None and record["cost_usd"] != 0:
                by_key.setdefault(record["key_id"], []).append(record)
        settled: dict[str, Settled] = {}
        ledger: list[dict[str, Any]] = []
        for user_id, user_records in sorted(by_user.items()):
            settled.update(await self._charge(conn, user_id, user_records, holder, ledger))
        key_consumed: dict[str, Decimal] = {}
        for key_id, key_records in sorted(by_key.items()):
            key_consumed.update(await self._spend_key(conn, key_id, key_records, holder))
        # The rows go in only now: their foreign keys share-lock the user and key rows, and a
        # share lock taken before the locks above would let two writers deadlock upgrading it.
        await self._usage_rows.run(conn, records)
        await self._settlements.run(conn, ledger)
        return [self._settled(record, settled, key_consumed) for record in records]

    @staticmethod
    def _settled(
        record: dict[str, Any], settled: dict[str, Settled], key_consumed: dict[str, Decimal]
    ) -> Settled:
        request_id = record["request_id"]
        done = settled.get(request_id) or Settled(request_id, record.get("user_id"), None)
        taken = key_consumed.get(request_id)
        return done if taken is None else replace(done, key_consumed=taken)

    async def _charge(
        self,
        conn: AsyncConnection,
        user_id: int,
        records: list[dict[str, Any]],
        holder: str | None,
        ledger: list[dict[str, Any]],
    ) -> dict[str, Settled]:
        """One ledger entry per request: `settle` with its cost, or `release` for a request
        that ended without a bill (its hold just ends)."""
        balance, reserved = await self._lock_owner(conn, USER_LEASES, user_id)
        lease = await self._lock_lease(conn, USER_LEASES, user_id, holder) if holder else None
        leased = lease[1] if lease else ZERO
        settled: dict[str, Settled] = {}
        charged_at = now()
        for record in records:
            cost: Decimal = record["cost_usd"]
            consumed = min(cost, leased)
            leased = MONEY.subtract(leased, consumed)
            reserved = MONEY.subtract(reserved, consumed)
            balance = MONEY.subtract(balance, cost)
            ledger.append(
                {
                    "user_id": user_id,
                    "kind": RELEASE if record["status"] == STATUS_INTERRUPTED else SETTLE,
                    "amount": cost.copy_negate() if cost else ZERO,
                    "reserved_change": consumed.copy_negate() if consumed else ZERO,
                    "balance_after": balance,
                    "request_id": record["request_id"],
                    "note": None,
                    "lease_id": lease[0] if lease and consumed else None,
                    "created_at": charged_at,
                }
            )
            settled[record["request_id"]] = Settled(
                record["request_id"], user_id, balance if cost else None, consumed
            )
        values = {"balance": balance, "reserved": reserved}
        await self._write_back(conn, USER_LEASES, user_id, values, lease, leased)
        return settled

    async def _spend_key(
        self, conn: AsyncConnection, key_id: int, records: list[dict[str, Any]], holder: str | None
    ) -> dict[str, Decimal]:
        """Add the costs to the key's spending, out of the holder's lease on its cap first."""
        # The key's cap, what it has spent and what is reserved of the cap, locked.
        row = await STATEMENTS[KEY_LEASES.name].lock_owner.one(conn, owner=key_id)
        spent, reserved = Decimal(str(row[1])), Decimal(str(row[2]))
        lease = await self._lock_lease(conn, KEY_LEASES, key_id, holder) if holder else None
        leased = lease[1] if lease else ZERO
        consumed: dict[str, Decimal] = {}
        for record in records:
            taken = min(record["cost_usd"], leased)
            leased = MONEY.subtract(leased, taken)
            reserved = MONEY.subtract(reserved, taken)
            spent = MONEY.add(spent, record["cost_usd"])
            consumed[record["request_id"]] = taken
        values = {"spent_usd": spent, "reserved_usd": reserved}
        await self._write_back(conn, KEY_LEASES, key_id, values, lease, leased)
        return consumed

    @staticmethod
    async def _write_back(
        conn: AsyncConnection,
        scope: LeaseScope,
        owner_id: int,
        values: dict[str, Decimal],
        lease: tuple[int, Decimal] | None,
        leased: Decimal,
    ) -> None:
        """Store what settling left of an owner's row and of the settling process's lease."""
        statements = STATEMENTS[scope.name]
        new = {f"new_{name}": value for name, value in values.items()}
        await statements.write_owner.run(conn, owner=owner_id, **new)
        if lease is not None:
            await statements.write_lease.run(conn, lease=lease[0], new_amount=leased)

    @staticmethod
    async def _lock_owner(
        conn: AsyncConnection, scope: LeaseScope, owner_id: int
    ) -> tuple[Decimal, Decimal]:
        """What the owner may spend in all (a balance; a cap less what was spent) and what of
        it is reserved, locked for this transaction."""
        row = await STATEMENTS[scope.name].lock_owner.one(conn, owner=owner_id)
        return scope.limit(row), Decimal(str(row[-1]))

    @staticmethod
    async def _lock_lease(
        conn: AsyncConnection, scope: LeaseScope, owner_id: int, holder: str
    ) -> tuple[int, Decimal] | None:
        statement = STATEMENTS[scope.name].lock_lease
        found = await statement.rows(conn, owner=owner_id, holder=holder)
        return (found[0][0], Decimal(str(found[0][1]))) if found else None

    # -- leases: admission without a database round trip per request -----------------------

    async def acquire_lease(
        self,
        owner_id: int,
        holder: str,
        needed: Decimal,
        wanted: Decimal,
        scope: LeaseScope | None = None,
    ) -> Decimal:
        """Set part of what the owner may still spend aside for `holder`.

        The owner is a user (its unreserved balance) or, with `scope=KEY_LEASES`, a capped
        key (its cap less spending and reservations). Grants at least `needed` (or nothing,
        returning 0) and at most `wanted`, never more than half of what is free beyond
        `needed`, so other processes keep room. A user's grant is a `hold` ledger entry.
        """
        scope = scope or USER_LEASES
        async with self.engine.begin() as conn:
            limit, reserved = await self._lock_owner(conn, scope, owner_id)
            available = MONEY.subtract(limit, reserved)
            if available < needed or needed <= 0:
                return ZERO
            amount = max(needed, min(wanted, MONEY.divide(available, Decimal(2))))
            await conn.execute(
                update(scope.owner)
                .where(scope.owner_id == owner_id)
                .values({scope.reserved.key: MONEY.add(reserved, amount)})
            )
            lease_id = await self._add_to_lease(conn, scope, owner_id, holder, amount)
            if scope.ledger:
                await self._ledger(
                    conn, owner_id, HOLD, ZERO, limit, None, f"lease of {holder}",
                    reserved_change=amount, lease_id=lease_id,
                )  # fmt: skip
            return amount

    @staticmethod
    async def _add_to_lease(
        conn: AsyncConnection, scope: LeaseScope, owner_id: int, holder: str, amount: Decimal
    ) -> int:
        current = await Store._lock_lease(conn, scope, owner_id, holder)
        if current is None:
            result = await conn.execute(
                insert(scope.lease)
                .values(
                    {
                        scope.lease_owner.key: owner_id,
                        "holder": holder,
                        "amount": amount,
                        "renewed_at": now(),
                    }
                )
                .returning(scope.lease.id)
            )
            lease_id: int = result.scalar_one()
            return lease_id
        await conn.execute(
            update(scope.lease)
            .where(scope.lease.id == current[0])
            .values(amount=MONEY.add(current[1], amount), renewed_at=now())
        )
        return current[0]

    async def leased_to_others(
        self, owner_id: int, holder: str, scope: LeaseScope | None = None
    ) -> tuple[Decimal, Decimal]:
        """What the owner may spend in all, and how much of it the leases of holders other
        than `holder` set aside; read, not locked."""
        scope = scope or USER_LEASES
        async with self._read() as conn:
            row = (
                await conn.execute(select(*scope.limit_columns).where(scope.owner_id == owner_id))
            ).one_or_none()
            others = await conn.scalar(
                select(func.coalesce(func.sum(scope.lease.amount), 0)).where(
                    scope.lease_owner == owner_id, scope.lease.holder != holder
                )
            )
        limit = scope.limit(row) if row is not None else ZERO
        return limit, Decimal(str(others))

    async def release_lease(
        self, owner_id: int, holder: str, amount: Decimal, scope: LeaseScope | None = None
    ) -> Decimal:
        """Hand back up to `amount` of the holder's lease; returns what was handed back.

        Returning a user's lease is a `release` ledger entry.
        """
        scope = scope or USER_LEASES
        async with self.engine.begin() as conn:
            limit, reserved = await self._lock_owner(conn, scope, owner_id)
            lease = await self._lock_lease(conn, scope, owner_id, holder)
            if lease is None:
                return ZERO
            returned = min(amount, lease[1])
            await conn.execute(
                update(scope.owner)
                .where(scope.owner_id == owner_id)
                .values({scope.reserved.key: MONEY.subtract(reserved, returned)})
            )
            if returned == lease[1]:
                await conn.execute(delete(scope.lease).where(scope.lease.id == lease[0]))
            else:
                await conn.execute(
                    update(scope.lease)
                    .where(scope.lease.id == lease[0])
                    .values(amount=MONEY.subtract(lease[1], returned))
                )
            if scope.ledger and returned:
                await self._ledger(
                    conn, owner_id, RELEASE, ZERO, limit, None, f"lease of {holder}",
                    reserved_change=returned.copy_negate(), lease_id=lease[0],
                )  # fmt: skip
            return returned

    async def renew_leases(self, holder: str) -> dict[tuple[str, int], Decimal]:
        """Mark the holder's leases as alive; returns them as the database has them, by
        (scope name, owner id)."""
        found: dict[tuple[str, int], Decimal] = {}
        async with self.engine.begin() as conn:
            for scope in SCOPES:
                await conn.execute(
                    update(scope.lease).where(scope.lease.holder == holder).values(renewed_at=now())
                )
                rows = await conn.execute(
                    select(scope.lease_owner, scope.lease.amount).where(
                        scope.lease.holder == holder
                    )
                )
                found.update({(scope.name, row[0]): Decimal(str(row[1])) for row in rows})
        return found

    async def reap_leases(self, older_than: datetime) -> int:
        """Return to their owners the leases of holders that stopped renewing them."""
        return await self._release_where(lambda lease: lease.renewed_at < older_than)

    async def release_holder(self, holder: str) -> int:
        """Return every lease of one holder at once (a process known to be gone)."""
        return await self._release_where(lambda lease: lease.holder == holder)

    async def _release_where(self, condition: Callable[[Any], Any]) -> int:
        """Return whole every lease of every scope that meets `condition`; how many."""
        released = 0
        for scope in SCOPES:
            async with self._read() as conn:
                rows = (
                    await conn.execute(
                        select(scope.lease_owner, scope.lease.holder).where(condition(scope.lease))
                    )
                ).all()
            for owner_id, holder in rows:
                await self.release_lease(owner_id, holder, EVERYTHING, scope)
            released += len(rows)
        return released

    async def verify_ledger(self) -> tuple[list[str], dict[str, int]]:
        """Prove every balance and reservation from the ledger, every request's settlement,
        and every capped key's spending; returns the problems found and what was checked."""
        async with self._read() as conn:
            snapshot = Snapshot(
                users=(
                    await conn.execute(select(User.id, User.name, User.balance, User.reserved))
                ).all(),
                entries=(
                    await conn.execute(
                        select(
                            LedgerEntry.user_id,
                            LedgerEntry.kind,
                            LedgerEntry.amount,
                            LedgerEntry.reserved_change,
                            LedgerEntry.request_id,
                        )
                    )
                ).all(),
                leases=(
                    await conn.execute(select(BalanceLease.user_id, BalanceLease.amount))
                ).all(),
                usage=(
                    await conn.execute(
                        select(
                            UsageRecord.request_id,
                            UsageRecord.user_id,
                            UsageRecord.key_id,
                            UsageRecord.cost_usd,
                        )
                    )
                ).all(),
                keys=(
                    await conn.execute(select(ApiKey.id, ApiKey.spent_usd, ApiKey.reserved_usd))
                ).all(),
                key_leases=(await conn.execute(select(KeyLease.key_id, KeyLease.amount))).all(),
            )
        counts = {
            "users": len(snapshot.users),
            "ledger entries": len(snapshot.entries),
            "usage rows": len(snapshot.usage),
        }
        return ledger_problems(snapshot), counts

    async def leases(self, scope: LeaseScope | None = None) -> list[dict[str, Any]]:
        """Every open lease of users' balances (or of `scope`)."""
        async with self._read() as conn:
            rows = (await conn.execute(select((scope or USER_LEASES).lease))).mappings().all()
        return [dict(row) for row in rows]

    @staticmethod
    async def _ledger(
        conn: AsyncConnection,
        user_id: int,
        kind: str,
        amount: Decimal,
        balance_after: Decimal,
        request_id: str | None,
        note: str | None,
        *,
        reserved_change: Decimal = ZERO,
        lease_id: int | None = None,
        operator: str | None = None,
        refers_to: str | None = None,
    ) -> None:
        await conn.execute(
            insert(LedgerEntry).values(
                user_id=user_id,
                kind=kind,
                amount=amount,
                balance_after=balance_after,
                request_id=request_id,
                note=note,
                reserved_change=reserved_change,
                lease_id=lease_id,
                operator=operator,
                refers_to=refers_to,
                created_at=now(),
            )
        )

    # -- billing traces: four-stage bill logs for chosen keys, switched at run time ------------

    async def set_trace(self, key_id: int, on: bool) -> None:
        async with self.engine.begin() as conn:
            if not on:
                result = await conn.execute(
                    delete(BillingTrace).where(BillingTrace.key_id == key_id)
                )
                if result.rowcount == 0:
                    raise StoreError(f"billing of key {key_id} is not traced")
            elif await conn.scalar(select(ApiKey.id).where(ApiKey.id == key_id)) is None:
                raise StoreError(f"no key with id {key_id}")
            elif (
                await conn.scalar(select(BillingTrace.key_id).where(BillingTrace.key_id == key_id))
                is None
            ):
                await conn.execute(insert(BillingTrace).values(key_id=key_id, created_at=now()))
            await self._bump(conn)

    async def traced_keys(self) -> frozenset[int]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(BillingTrace.key_id))).scalars().all()
            await conn.rollback()
        return frozenset(rows)

    # -- usage -------------------------------------------------------------------------------

    async def usage(self, request_id: str) -> dict[str, Any] | None:
        async with self._read() as conn:
            row = (
                (await conn.execute(_usage_query().where(UsageRecord.request_id == request_id)))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    async def list_usage(
        self, limit: int = 50, user_name: str | None = None
    ) -> list[dict[str, Any]]:
        query = _usage_query().order_by(
            UsageRecord.started_at.desc(), UsageRecord.request_id.desc()
        )
        if user_name is not None:
            query = query.where(User.name == user_name)
        async with self._read() as conn:
            if user_name is not None:
                await _require_user(conn, user_name)
            rows = (await conn.execute(query.limit(limit))).mappings().all()
        return [dict(row) for row in rows]

    async def stream_usage(
        self, start: datetime | None, end: datetime | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Usage rows started in [start, end), oldest first, read in chunks, not all at once."""
        query = _usage_query().order_by(UsageRecord.started_at, UsageRecord.request_id)
        if start is not None:
            query = query.where(UsageRecord.started_at >= start)
        if end is not None:
            query = query.where(UsageRecord.started_at < end)
        async with self._read() as conn:
            result = await conn.stream(query.execution_options(yield_per=1000))
            async for row in result.mappings():
                yield dict(row)

    async def ledger(self, user_name: str) -> list[dict[str, Any]]:
        query = (
            select(
                LedgerEntry.id,
                LedgerEntry.kind,
                LedgerEntry.amount,
                LedgerEntry.reserved_change,
                LedgerEntry.balance_after,
                LedgerEntry.request_id,
                LedgerEntry.lease_id,
                LedgerEntry.refers_to,
                LedgerEntry.note,
                LedgerEntry.operator,
                LedgerEntry.created_at,
            )
            .join(User, User.id == LedgerEntry.user_id)
            .where(User.name == user_name)
            .order_by(LedgerEntry.id)
        )
        async with self._read() as conn:
            await _require_user(conn, user_name)
            rows = (await conn.execute(query)).mappings().all()
        return [dict(row) for row in rows]

    async def database_id(self) -> str:
        """This database's own random identity, made by its migrations: the same however the
        database is reached, and new for each database (a copy of one keeps its identity)."""
        async with self._read() as conn:
            return str((await conn.execute(select(DatabaseIdentity.id))).scalar_one())

    async def count_usage(self) -> int:
        async with self._read() as conn:
            value = await conn.scalar(select(func.count()).select_from(UsageRecord))
        return int(value or 0)


async def _require_user(conn: AsyncConnection, name: str) -> None:
    if await conn.scalar(select(User.id).where(User.name == name)) is None:
        raise StoreError(f"no user named {name!r}")


def _usage_query() -> Select[Any]:
    return (
        select(
            *UsageRecord.__table__.columns,
            User.name.label("user"),
            ApiKey.display.label("key"),
            UpstreamAccount.name.label("account"),
        )
        .outerjoin(User, User.id == UsageRecord.user_id)
        .outerjoin(ApiKey, ApiKey.id == UsageRecord.key_id)
        .outerjoin(UpstreamAccount, UpstreamAccount.id == UsageRecord.account_id)
    )


def _without_account(record: dict[str, Any]) -> dict[str, Any]:
    """`record` naming no account, flagged FLAG_ACCOUNT_REMOVED; its attempts still say which
    account served it."""
    flags = orjson.loads(record["flags"]) if record.get("flags") else []
    if FLAG_ACCOUNT_REMOVED not in flags:
        flags.append(FLAG_ACCOUNT_REMOVED)
    return {**record, "account_id": None, "flags": orjson.dumps(flags).decode()}
