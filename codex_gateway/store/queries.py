"""Every statement the gateway and its CLI run, behind one `Store` object."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codex_gateway.billing.pricing import MONEY, ZERO, Price, plain
from codex_gateway.store.db import READ_ONLY
from codex_gateway.store.tables import (
    ApiKey,
    BalanceLease,
    BillingTrace,
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


@dataclass(frozen=True)
class Settled:
    """What settling one usage row did: the new balance (None if untouched) and how much of
    the cost came out of the settling process's lease."""

    request_id: str
    user_id: int | None
    balance: Decimal | None
    consumed: Decimal


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


def now() -> datetime:
    return datetime.now(UTC)


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


class Store:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"

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
    async def _bump(conn: AsyncConnection) -> None:
        await conn.execute(
            update(Revision).where(Revision.id == 1).values(value=Revision.value + 1)
        )

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
    ) -> Decimal:
        """A refund or adjustment: a new ledger entry with its reason and operator.

        A refund that names a request must be that user's, and all refunds of one request
        together never exceed what it cost.
        """
        async with self.engine.begin() as conn:
            user_id, balance = await self._user_for_update(conn, name)
            if refers_to is not None:
                await self._check_refund(conn, user_id, refers_to, amount)
            new_balance = MONEY.add(balance, amount)
            await conn.execute(update(User).where(User.id == user_id).values(balance=new_balance))
            await conn.execute(
                insert(LedgerEntry).values(
                    user_id=user_id,
                    kind=kind,
                    amount=amount,
                    balance_after=new_balance,
                    note=reason,
                    operator=operator,
                    refers_to=refers_to,
                    created_at=now(),
                )
            )
            await self._bump(conn)
        return new_balance

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

    async def create_key(self, user_name: str, name: str | None = None) -> tuple[str, str]:
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
                )
            )
            await self._bump(conn)
        return raw, display

    async def list_keys(self, user_name: str | None = None) -> list[dict[str, Any]]:
        query = (
            select(
                ApiKey.id,
                ApiKey.display,
                ApiKey.name,
                User.name.label("user"),
                ApiKey.created_at,
                ApiKey.revoked_at,
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
            select(ApiKey.id, ApiKey.user_id, User.name, ApiKey.display, ApiKey.revoked_at)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == key_hash)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], row[3], row[4] is not None)

    async def active_keys(self) -> dict[str, KeyRecord]:
        query = (
            select(ApiKey.key_hash, ApiKey.id, ApiKey.user_id, User.name, ApiKey.display)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return {row[0]: KeyRecord(row[1], row[2], row[3], row[4], False) for row in rows}

    # -- upstream accounts -------------------------------------------------------------------

    async def add_account(
        self,
        name: str,
        kind: str,
        base_url: str,
        api_key: str,
        priority: int = 100,
        *,
        max_concurrency: int | None = None,
        weight: int = 1,
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Add an account; `extra` holds the columns of its kind (a ChatGPT account's)."""
        async with self.engine.begin() as conn:
            try:
                result = await conn.execute(
                    insert(UpstreamAccount)
                    .values(
                        name=name,
                        kind=kind,
                        base_url=base_url.rstrip("/"),
                        api_key=api_key,
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

    async def set_account_enabled(self, name: str, enabled: bool) -> None:
        """Enabling also clears a health mark: the operator says the account is fixed."""
        values: dict[str, Any] = {"enabled": enabled}
        if enabled:
            values.update(state="ready", state_reason=None, state_until=None)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(UpstreamAccount).where(UpstreamAccount.name == name).values(**values)
            )
            if result.rowcount == 0:
                raise StoreError(f"no account named {name!r}")
            await self._bump(conn)

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
            result = await conn.execute(delete(UpstreamAccount).where(UpstreamAccount.name == name))
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
            await self._bump(conn)
            revision = await conn.scalar(select(Revision.value).where(Revision.id == 1))
        return int(revision or 0)

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
                return Settled(record["request_id"], record.get("user_id"), None, ZERO)
            raise

    async def _settle_batch(
        self, conn: AsyncConnection, records: list[dict[str, Any]], holder: str | None
    ) -> list[Settled]:
        """Insert the rows; debit each user once for all their costs, lease first.

        Rows go in with one statement and ledger entries with another; each user with a cost
        is locked, debited and has its lease reduced once, in the order of the rows.
        """
        await conn.execute(insert(UsageRecord), records)
        charged: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            if record.get("user_id") is not None and record["cost_usd"] != 0:
                charged.setdefault(record["user_id"], []).append(record)
        settled: dict[str, Settled] = {}
        ledger: list[dict[str, Any]] = []
        for user_id, user_records in charged.items():
            settled.update(await self._charge(conn, user_id, user_records, holder, ledger))
        if ledger:
            await conn.execute(insert(LedgerEntry), ledger)
        return [
            settled.get(r["request_id"]) or Settled(r["request_id"], r.get("user_id"), None, ZERO)
            for r in records
        ]

    async def _charge(
        self,
        conn: AsyncConnection,
        user_id: int,
        records: list[dict[str, Any]],
        holder: str | None,
        ledger: list[dict[str, Any]],
    ) -> dict[str, Settled]:
        balance, reserved = await self._lock_user(conn, user_id)
        lease = await self._lock_lease(conn, user_id, holder) if holder else None
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
                    "kind": "charge",
                    "amount": cost.copy_negate(),
                    "balance_after": balance,
                    "request_id": record["request_id"],
                    "note": None,
                    "created_at": charged_at,
                }
            )
            settled[record["request_id"]] = Settled(
                record["request_id"], user_id, balance, consumed
            )
        await conn.execute(
            update(User).where(User.id == user_id).values(balance=balance, reserved=reserved)
        )
        if lease is not None:
            await conn.execute(
                update(BalanceLease).where(BalanceLease.id == lease[0]).values(amount=leased)
            )
        return settled

    @staticmethod
    async def _lock_user(conn: AsyncConnection, user_id: int) -> tuple[Decimal, Decimal]:
        """The user's balance and reserved amount, locked for this transaction."""
        row = (
            await conn.execute(
                select(User.balance, User.reserved).where(User.id == user_id).with_for_update()
            )
        ).one()
        return Decimal(str(row[0])), Decimal(str(row[1]))

    @staticmethod
    async def _lock_lease(
        conn: AsyncConnection, user_id: int, holder: str
    ) -> tuple[int, Decimal] | None:
        lease = (
            await conn.execute(
                select(BalanceLease.id, BalanceLease.amount)
                .where(BalanceLease.user_id == user_id, BalanceLease.holder == holder)
                .with_for_update()
            )
        ).first()
        return (lease[0], Decimal(str(lease[1]))) if lease else None

    # -- leases: admission without a database round trip per request -----------------------

    async def acquire_lease(
        self, user_id: int, holder: str, needed: Decimal, wanted: Decimal
    ) -> Decimal:
        """Set part of the user's unreserved balance aside for `holder`.

        Grants at least `needed` (or nothing, returning 0) and at most `wanted`, never more
        than half of what is unreserved beyond `needed`, so other processes keep room.
        """
        async with self.engine.begin() as conn:
            balance, reserved = await self._lock_user(conn, user_id)
            available = MONEY.subtract(balance, reserved)
            if available < needed or needed <= 0:
                return ZERO
            amount = max(needed, min(wanted, MONEY.divide(available, Decimal(2))))
            await conn.execute(
                update(User).where(User.id == user_id).values(reserved=MONEY.add(reserved, amount))
            )
            await self._add_to_lease(conn, user_id, holder, amount)
            return amount

    @staticmethod
    async def _add_to_lease(
        conn: AsyncConnection, user_id: int, holder: str, amount: Decimal
    ) -> None:
        current = (
            await conn.execute(
                select(BalanceLease.id, BalanceLease.amount).where(
                    BalanceLease.user_id == user_id, BalanceLease.holder == holder
                )
            )
        ).first()
        if current is None:
            await conn.execute(
                insert(BalanceLease).values(
                    user_id=user_id, holder=holder, amount=amount, renewed_at=now()
                )
            )
            return
        await conn.execute(
            update(BalanceLease)
            .where(BalanceLease.id == current[0])
            .values(amount=MONEY.add(Decimal(str(current[1])), amount), renewed_at=now())
        )

    async def release_lease(self, user_id: int, holder: str, amount: Decimal) -> Decimal:
        """Hand back up to `amount` of the holder's lease; returns what was handed back."""
        async with self.engine.begin() as conn:
            _, reserved = await self._lock_user(conn, user_id)
            lease = (
                await conn.execute(
                    select(BalanceLease.id, BalanceLease.amount).where(
                        BalanceLease.user_id == user_id, BalanceLease.holder == holder
                    )
                )
            ).first()
            if lease is None:
                return ZERO
            held = Decimal(str(lease[1]))
            returned = min(amount, held)
            await conn.execute(
                update(User)
                .where(User.id == user_id)
                .values(reserved=MONEY.subtract(reserved, returned))
            )
            if returned == held:
                await conn.execute(delete(BalanceLease).where(BalanceLease.id == lease[0]))
            else:
                await conn.execute(
                    update(BalanceLease)
                    .where(BalanceLease.id == lease[0])
                    .values(amount=MONEY.subtract(held, returned))
                )
            return returned

    async def renew_leases(self, holder: str) -> dict[int, Decimal]:
        """Mark the holder's leases as alive; returns them as the database has them."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(BalanceLease).where(BalanceLease.holder == holder).values(renewed_at=now())
            )
            rows = (
                await conn.execute(
                    select(BalanceLease.user_id, BalanceLease.amount).where(
                        BalanceLease.holder == holder
                    )
                )
            ).all()
        return {row[0]: Decimal(str(row[1])) for row in rows}

    async def reap_leases(self, older_than: datetime) -> int:
        """Return to their users the leases of holders that stopped renewing them."""
        async with self._read() as conn:
            stale = (
                await conn.execute(
                    select(BalanceLease.user_id, BalanceLease.holder).where(
                        BalanceLease.renewed_at < older_than
                    )
                )
            ).all()
        for user_id, holder in stale:
            await self.release_lease(user_id, holder, Decimal(10) ** 30)
        return len(stale)

    async def verify_ledger(self) -> tuple[list[str], dict[str, int]]:
        """Prove every balance from its ledger, and every charged request has one charge.

        Returns the problems found (empty when all is well) and what was checked.
        """
        async with self._read() as conn:
            users = (
                await conn.execute(select(User.id, User.name, User.balance, User.reserved))
            ).all()
            entries = (
                await conn.execute(
                    select(
                        LedgerEntry.user_id,
                        LedgerEntry.kind,
                        LedgerEntry.amount,
                        LedgerEntry.request_id,
                    )
                )
            ).all()
            leases = (await conn.execute(select(BalanceLease.user_id, BalanceLease.amount))).all()
            usage = (
                await conn.execute(
                    select(UsageRecord.request_id, UsageRecord.user_id, UsageRecord.cost_usd)
                )
            ).all()
        problems = _ledger_problems(users, entries, leases, usage)
        counts = {"users": len(users), "ledger entries": len(entries), "usage rows": len(usage)}
        return problems, counts

    async def leases(self) -> list[dict[str, Any]]:
        async with self._read() as conn:
            rows = (await conn.execute(select(BalanceLease))).mappings().all()
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
    ) -> None:
        await conn.execute(
            insert(LedgerEntry).values(
                user_id=user_id,
                kind=kind,
                amount=amount,
                balance_after=balance_after,
                request_id=request_id,
                note=note,
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
                LedgerEntry.balance_after,
                LedgerEntry.request_id,
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

    async def count_usage(self) -> int:
        async with self._read() as conn:
            value = await conn.scalar(select(func.count()).select_from(UsageRecord))
        return int(value or 0)


def _ledger_problems(
    users: Sequence[Row[int, str, Decimal, Decimal]],
    entries: Sequence[Row[int, str, Decimal, str | None]],
    leases: Sequence[Row[int, Decimal]],
    usage: Sequence[Row[str, int | None, Decimal]],
) -> list[str]:
    problems: list[str] = []
    ledger_sum: dict[int, Decimal] = {}
    charges: dict[str, list[Decimal]] = {}
    for user_id, kind, amount, request_id in entries:
        ledger_sum[user_id] = MONEY.add(ledger_sum.get(user_id, ZERO), Decimal(str(amount)))
        if kind == "charge" and request_id is not None:
            charges.setdefault(request_id, []).append(Decimal(str(amount)))
    leased: dict[int, Decimal] = {}
    for user_id, amount in leases:
        leased[user_id] = MONEY.add(leased.get(user_id, ZERO), Decimal(str(amount)))
    for user_id, name, balance, reserved in users:
        if Decimal(str(balance)) != ledger_sum.get(user_id, ZERO):
            problems.append(
                f"user {name}: balance {balance} but its ledger adds up to "
                f"{ledger_sum.get(user_id, ZERO)}"
            )
        if Decimal(str(reserved)) != leased.get(user_id, ZERO) or Decimal(str(reserved)) < 0:
            problems.append(
                f"user {name}: reserved {reserved} but its leases add up to "
                f"{leased.get(user_id, ZERO)}"
            )
    for request_id, owner, cost in usage:
        found = charges.pop(request_id, [])
        expected = [Decimal(str(cost)).copy_negate()] if owner is not None and cost else []
        if found != expected:
            problems.append(
                f"request {request_id}: costs {cost} but has charges {[str(c) for c in found]}"
            )
    problems.extend(f"charge for request {rid} has no usage row" for rid in charges)
    return problems


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
