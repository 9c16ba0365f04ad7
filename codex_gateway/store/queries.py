"""Every statement the gateway and its CLI run, behind one `Store` object."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codex_gateway.billing.pricing import MONEY, Price
from codex_gateway.store.tables import (
    ApiKey,
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
class AccountRecord:
    id: int
    name: str
    kind: str
    base_url: str
    api_key: str
    priority: int
    enabled: bool
    max_concurrency: int | None = None
    weight: int = 1
    state: str = "ready"
    state_reason: str | None = None
    state_until: datetime | None = None


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
    return f"{raw[:10]}…{raw[-4:]}"


class Store:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"

    # -- revision: lets every process notice administrative changes --------------------------

    async def revision(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(Revision.value).where(Revision.id == 1))
            await conn.rollback()
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
                    .values(name=name, balance=balance, created_at=now())
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
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(User).order_by(User.id))).mappings().all()
            await conn.rollback()
        return [dict(row) for row in rows]

    async def balances(self) -> dict[int, Decimal]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(User.id, User.balance))).all()
            await conn.rollback()
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
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
            await conn.rollback()
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
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
            await conn.rollback()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], row[3], row[4] is not None)

    async def active_keys(self) -> dict[str, KeyRecord]:
        query = (
            select(ApiKey.key_hash, ApiKey.id, ApiKey.user_id, User.name, ApiKey.display)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.revoked_at.is_(None))
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            await conn.rollback()
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
    ) -> int:
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

    async def remove_account(self, name: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(UpstreamAccount).where(UpstreamAccount.name == name))
            if result.rowcount == 0:
                raise StoreError(f"no account named {name!r}")
            await self._bump(conn)

    async def accounts(self) -> list[AccountRecord]:
        async with self.engine.connect() as conn:
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
                    ).order_by(UpstreamAccount.priority, UpstreamAccount.id)
                )
            ).all()
            await conn.rollback()
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
        async with self.engine.connect() as conn:
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
            await conn.rollback()
        return [Price(*row) for row in rows]

    # -- settlement --------------------------------------------------------------------------

    async def settle(self, record: dict[str, Any]) -> Decimal | None:
        """Write a usage row and debit its cost in one transaction; once per request id.

        Returns the user's new balance, or None when there was no user or the request id was
        settled before (a repeat changes nothing).
        """
        cost: Decimal = record["cost_usd"]
        user_id = record.get("user_id")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(UsageRecord).values(**record))
                if user_id is None:
                    return None
                balance = await self._debit(conn, user_id, cost)
                await self._ledger(
                    conn, user_id, "charge", -cost, balance, record["request_id"], None
                )
                return balance
        except IntegrityError:
            if await self.usage(record["request_id"]) is not None:
                return None
            raise

    async def _debit(self, conn: AsyncConnection, user_id: int, cost: Decimal) -> Decimal:
        if not self.is_sqlite:
            balance = await conn.scalar(
                update(User)
                .where(User.id == user_id)
                .values(balance=User.balance - cost)
                .returning(User.balance)
            )
            return Decimal(str(balance))
        current = await conn.scalar(select(User.balance).where(User.id == user_id))
        balance = MONEY.subtract(Decimal(str(current)), cost)
        await conn.execute(update(User).where(User.id == user_id).values(balance=balance))
        return balance

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

    # -- usage -------------------------------------------------------------------------------

    async def usage(self, request_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(_usage_query().where(UsageRecord.request_id == request_id)))
                .mappings()
                .first()
            )
            await conn.rollback()
        return dict(row) if row else None

    async def list_usage(
        self, limit: int = 50, user_name: str | None = None
    ) -> list[dict[str, Any]]:
        query = _usage_query().order_by(
            UsageRecord.started_at.desc(), UsageRecord.request_id.desc()
        )
        if user_name is not None:
            query = query.where(User.name == user_name)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(limit))).mappings().all()
            await conn.rollback()
        return [dict(row) for row in rows]

    async def ledger(self, user_name: str) -> list[dict[str, Any]]:
        query = (
            select(
                LedgerEntry.id,
                LedgerEntry.kind,
                LedgerEntry.amount,
                LedgerEntry.balance_after,
                LedgerEntry.request_id,
                LedgerEntry.note,
                LedgerEntry.created_at,
            )
            .join(User, User.id == LedgerEntry.user_id)
            .where(User.name == user_name)
            .order_by(LedgerEntry.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
            await conn.rollback()
        return [dict(row) for row in rows]

    async def count_usage(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(func.count()).select_from(UsageRecord))
            await conn.rollback()
        return int(value or 0)


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
