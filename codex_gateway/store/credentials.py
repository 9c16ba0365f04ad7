"""ChatGPT account credentials in the database: sealed tokens, state, quota windows.

Tokens arrive here already sealed; this module never sees them in clear. A refresh runs
inside `locked()`, which holds the account's row lock (PostgreSQL `SELECT ... FOR UPDATE`;
SQLite's `BEGIN IMMEDIATE`, taken by every write transaction) until the new tokens are
committed, so two gateway processes never spend one single-use refresh token twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from codex_gateway.store.queries import Store, StoreError, now
from codex_gateway.store.tables import UpstreamAccount

KIND_CHATGPT = "chatgpt"
STATE_READY = "ready"
STATE_NEEDS_RELOGIN = "needs_relogin"


@dataclass(frozen=True)
class SealedTokens:
    access_token: str
    refresh_token: str
    id_token: str | None
    expires_at: datetime | None


@dataclass(frozen=True)
class ChatGPTAccount:
    id: int
    name: str
    chatgpt_account_id: str
    tokens: SealedTokens
    state: str
    state_reason: str | None


@dataclass(frozen=True)
class AccountState:
    """What `accounts list` shows beside an account: its state, why, and its quota."""

    state: str
    state_reason: str | None
    quota: str | None
    token_expires_at: datetime | None
    # A ChatGPT account's access and refresh tokens, sealed, for `accounts list` to check
    # against its own secret key; none for an API account.
    sealed_tokens: tuple[str, ...] = field(default=(), repr=False)


_COLUMNS = (
    UpstreamAccount.id,
    UpstreamAccount.name,
    UpstreamAccount.chatgpt_account_id,
    UpstreamAccount.access_token_sealed,
    UpstreamAccount.refresh_token_sealed,
    UpstreamAccount.id_token_sealed,
    UpstreamAccount.token_expires_at,
    UpstreamAccount.state,
    UpstreamAccount.state_reason,
)


def _held(*sealed: str | None) -> tuple[str, ...]:
    return tuple(value for value in sealed if value is not None)


def _account(row: Any) -> ChatGPTAccount:
    tokens = SealedTokens(row[3], row[4], row[5], row[6])
    return ChatGPTAccount(row[0], row[1], row[2], tokens, row[7], row[8])


class LockedAccount:
    """An account row held for update; what is saved commits when the lock is released."""

    def __init__(self, conn: AsyncConnection, account: ChatGPTAccount):
        self._conn = conn
        self.account = account

    async def save_tokens(self, tokens: SealedTokens) -> None:
        await self._conn.execute(
            update(UpstreamAccount)
            .where(UpstreamAccount.id == self.account.id)
            .values(
                access_token_sealed=tokens.access_token,
                refresh_token_sealed=tokens.refresh_token,
                id_token_sealed=tokens.id_token,
                token_expires_at=tokens.expires_at,
                last_refresh_at=now(),
                state=STATE_READY,
                state_reason=None,
            )
        )

    async def mark_needs_relogin(self, reason: str) -> None:
        """Take the account out of rotation until an operator imports fresh credentials."""
        await self._conn.execute(
            update(UpstreamAccount)
            .where(UpstreamAccount.id == self.account.id)
            .values(state=STATE_NEEDS_RELOGIN, state_reason=reason)
        )
        await Store._bump(self._conn)


class CredentialStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def add_chatgpt_account(
        self,
        name: str,
        base_url: str,
        chatgpt_account_id: str,
        tokens: SealedTokens,
        priority: int = 100,
        max_concurrency: int | None = None,
        weight: int = 1,
    ) -> int:
        return await Store(self.engine).add_account(
            name,
            KIND_CHATGPT,
            base_url,
            "",
            priority,
            max_concurrency=max_concurrency,
            weight=weight,
            extra={
                "chatgpt_account_id": chatgpt_account_id,
                "access_token_sealed": tokens.access_token,
                "refresh_token_sealed": tokens.refresh_token,
                "id_token_sealed": tokens.id_token,
                "token_expires_at": tokens.expires_at,
            },
        )

    async def imported_as(self, chatgpt_account_id: str) -> list[str]:
        """The names of the gateway accounts already holding tokens of this ChatGPT account."""
        async with self.engine.connect() as conn:
            names = await conn.scalars(
                select(UpstreamAccount.name).where(
                    UpstreamAccount.kind == KIND_CHATGPT,
                    UpstreamAccount.chatgpt_account_id == chatgpt_account_id,
                )
            )
            await conn.rollback()
        return list(names)

    async def replace_tokens(
        self, name: str, base_url: str, chatgpt_account_id: str, tokens: SealedTokens
    ) -> None:
        """New credentials for an existing account after a new sign-in; it is ready again."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(UpstreamAccount)
                .where(UpstreamAccount.name == name, UpstreamAccount.kind == KIND_CHATGPT)
                .values(
                    base_url=base_url.rstrip("/"),
                    chatgpt_account_id=chatgpt_account_id,
                    access_token_sealed=tokens.access_token,
                    refresh_token_sealed=tokens.refresh_token,
                    id_token_sealed=tokens.id_token,
                    token_expires_at=tokens.expires_at,
                    state=STATE_READY,
                    state_reason=None,
                )
            )
            if result.rowcount == 0:
                raise StoreError(f"no ChatGPT account named {name!r} to replace")
            await Store._bump(conn)

    async def account(self, account_id: int) -> ChatGPTAccount:
        async with self.engine.connect() as conn:
            row = (await conn.execute(self._select(account_id))).first()
            await conn.rollback()
        if row is None:
            raise StoreError(f"no ChatGPT account with id {account_id}")
        return _account(row)

    async def account_id(self, name: str) -> int:
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                select(UpstreamAccount.id).where(
                    UpstreamAccount.name == name, UpstreamAccount.kind == KIND_CHATGPT
                )
            )
            await conn.rollback()
        if found is None:
            raise StoreError(f"no ChatGPT account named {name!r}")
        return int(found)

    @asynccontextmanager
    async def locked(self, account_id: int) -> AsyncIterator[LockedAccount]:
        """The account row, locked against every other process until the block ends."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(self._select(account_id).with_for_update())).first()
            if row is None:
                raise StoreError(f"no ChatGPT account with id {account_id}")
            yield LockedAccount(conn, _account(row))

    async def save_quota(self, account_id: int, quota_json: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(UpstreamAccount)
                .where(UpstreamAccount.id == account_id)
                .values(quota=quota_json)
            )

    async def states(self) -> dict[int, AccountState]:
        query = select(
            UpstreamAccount.id,
            UpstreamAccount.state,
            UpstreamAccount.state_reason,
            UpstreamAccount.quota,
            UpstreamAccount.token_expires_at,
            UpstreamAccount.access_token_sealed,
            UpstreamAccount.refresh_token_sealed,
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            await conn.rollback()
        return {
            row[0]: AccountState(row[1], row[2], row[3], row[4], _held(row[5], row[6]))
            for row in rows
        }

    @staticmethod
    def _select(account_id: int) -> Any:
        return select(*_COLUMNS).where(
            UpstreamAccount.id == account_id, UpstreamAccount.kind == KIND_CHATGPT
        )
