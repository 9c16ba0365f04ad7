"""The one application object: settings, database, in-memory catalog, admission, upstream.

It also owns what operations need: the metrics registry, the readiness checks, and the spool
of usage rows the database could not take, which the next start replays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from codex_gateway.billing.admission import Admission, Hold
from codex_gateway.billing.journal import HoldJournal, recover
from codex_gateway.billing.settlement import Outcome, bill, cut_by_shutdown
from codex_gateway.billing.settler import Settler
from codex_gateway.billing.spool import Spool
from codex_gateway.catalog import RELAYED_KINDS, Catalog
from codex_gateway.coalescer import WriteCoalescer
from codex_gateway.config import Settings
from codex_gateway.errors import CredentialError, DatabaseUnavailable
from codex_gateway.metrics import Metrics
from codex_gateway.readiness import Readiness
from codex_gateway.relay.chatgpt import SessionIds
from codex_gateway.relay.estimate import TokenCounter
from codex_gateway.sandbox import ACCOUNT_KEY as SANDBOX_KEY
from codex_gateway.sandbox import ACCOUNT_NAME as SANDBOX_ACCOUNT
from codex_gateway.store.credentials import KIND_CHATGPT, CredentialStore
from codex_gateway.store.db import (
    create_engine,
    failure,
    in_memory,
    is_sqlite,
    migrate_unless_newer,
)
from codex_gateway.store.queries import Settled, Store
from codex_gateway.store.thread import GRANTS_POOL_SIZE, StoreThread
from codex_gateway.upstream.chatgpt_auth import TokenRefresher
from codex_gateway.upstream.client import UpstreamClient
from codex_gateway.upstream.kinds import KIND_OPENAI, ChatGPTKind, account_kinds
from codex_gateway.upstream.pool import AccountPool
from codex_gateway.upstream.quota import QuotaBook
from codex_gateway.upstream.router import Router
from codex_gateway.upstream.sealing import (
    SEAL_ONCE_THE_GATEWAY_HAS_THE_KEY,
    SET_A_SECRET_KEY,
    ApiKeyOpener,
    configured_cipher,
)
from codex_gateway.upstream.stickiness import build_stickiness
from codex_gateway.version import build_info

log = logging.getLogger(__name__)

ASGIApp = Any
FLAG_CANCELLED = "cancelled"


class Gateway:
    def __init__(
        self,
        settings: Settings,
        sandbox: ASGIApp | None = None,
        alone: bool = False,
        advises: bool = True,
    ):
        """`alone`: the only worker of its `serve`, whose SQLite writer then runs at the
        lowest priority (`store/thread.py`). `advises`: this process warns about what every
        worker of its `serve` shares (`_advise`); of several workers, only the first does."""
        self.settings = settings
        self.advises = advises
        self.build = build_info()
        self.version = self.build.version
        self.engine = create_engine(settings.database_url)
        self.store = Store(self.engine)
        # Seals ChatGPT tokens and upstream API keys; None without a secret key. A key that
        # is set but unusable (an unreadable key file) is refused at start.
        self.cipher = configured_cipher(settings)
        self.catalog = Catalog(
            self.store,
            RELAYED_KINDS if self.cipher else RELAYED_KINDS - {KIND_CHATGPT},
            ApiKeyOpener(self.cipher, advises=advises),
        )
        # Leases grow on a thread and engine of their own (`store/thread.py`), but for an
        # in-memory database, which a second engine would not see.
        url = settings.database_url
        self.grants = (
            None
            if in_memory(url)
            else StoreThread(url, name="lease-grants", pool_size=GRANTS_POOL_SIZE)
        )
        self.admission = Admission(
            self.store,
            lease_ttl=settings.lease_ttl_seconds,
            idle_seconds=settings.lease_idle_seconds,
            grants=self.grants,
        )
        self.catalog.on_limits = self.admission.limits_changed
        # The server's answers and the upstream requests go out through one coalescer.
        self.coalescer = WriteCoalescer()
        self.client = UpstreamClient(
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            pool_size=settings.upstream_pool_size,
            keepalive=settings.upstream_keepalive_seconds,
            coalescer=self.coalescer,
        )
        self.pool = AccountPool(
            self.store,
            self.catalog.usable_accounts,
            lambda: self.catalog.revision,
            lambda: self.catalog.left_out,
        )
        self.metrics = Metrics()
        credentials = CredentialStore(self.engine)
        # Hands out ChatGPT access tokens from memory, refreshing them when due or after a
        # 401; None when no secret key opens the stored tokens.
        self.refresher = (
            TokenRefresher(
                credentials,
                self.cipher,
                self.client,
                settings.chatgpt_token_url,
                timeout=settings.token_refresh_timeout_seconds,
            )
            if self.cipher
            else None
        )
        self.quotas = QuotaBook(self.pool, credentials, advises=advises)
        self.pool.on_ready = self.quotas.lift
        self.router = Router(
            self.client,
            self.pool,
            build_stickiness(
                settings.redis_url or "", settings.redis_prefix, settings.sticky_ttl_seconds
            ),
            settings,
            self.metrics,
            account_kinds(self._chatgpt_kind()),
            self.quotas,
        )
        self.tokens = TokenCounter()
        self.sandbox = sandbox
        # Journals and spool lines name their database by its identity, read at `start`, so
        # that gateways of different databases sharing a folder never settle each other's bills.
        self.spool = Spool(Path(settings.spool_path))
        self.journal = HoldJournal(settings.journal_path, self.admission.holder)
        # The usage writer's statements run on a thread and engine of their own, so that the
        # request loop waits once per batch (not for an in-memory database, which a second
        # engine would not see).
        lowered = alone and is_sqlite(url)
        self.writer = None if in_memory(url) else StoreThread(url, lowered=lowered)
        self.settler = Settler(
            self.writer or self.store,
            self.admission.holder,
            self._settled,
            self._spool,
            backlog_limit=settings.writer_backlog_rows,
            on_behind=self.writer.behind if self.writer is not None else None,
            on_pace=self.metrics.writer_paces.inc if lowered else None,
        )
        self.readiness = Readiness(self.engine, self.catalog, settings.redis_url)
        # Relay requests being served; a graceful stop waits for them. Each holds part of a
        # balance until its row is written, so open holds are these plus the queued rows.
        self.in_flight = 0
        self.metrics.track(lambda: self.in_flight, lambda: self.in_flight + self.settler.pending)
        # Set by a second SIGTERM: bills go straight to the spool instead of the database.
        self.forced = False
        self._tasks: list[asyncio.Task[None]] = []
        # The loop the gateway serves on, once started (`settle` asks it for the running task).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Dead processes' journals of other databases in the journal folder, reported once.
        self._foreign_journals: set[str] = set()

    def _chatgpt_kind(self) -> ChatGPTKind | None:
        if self.cipher is None or self.refresher is None:
            return None
        return ChatGPTKind(self.refresher, SessionIds(self.cipher.session_key))

    async def start(self) -> None:
        try:
            migrated = await migrate_unless_newer(self.engine)
        except (OSError, SQLAlchemyError) as exc:
            raise DatabaseUnavailable(failure(self.settings.database_url, exc)) from None
        if migrated is None:
            self._advise("the database was migrated by a newer version; serving it as it is")
        database = await self.store.database_id()
        self.spool.database = database
        self.journal.database = database
        await self.spool.replay(self.store.settle_many)
        self.journal.start()
        await self.recover_journals()
        await self.catalog.refresh()
        await self.quotas.load(self.catalog.usable_accounts())
        await self._check_secret_key()
        if self.cipher is None and any(a.kind == KIND_CHATGPT for a in self.catalog.accounts):
            self._advise(
                "ChatGPT accounts stay out of rotation: no secret key to open their tokens; %s",
                SET_A_SECRET_KEY,
            )
        self._warn_of_keys_in_clear()
        if self.writer is not None:
            self.writer.start()
        if self.grants is not None:
            self.grants.start()
        self.settler.start()
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self.catalog.poll(self.settings.catalog_refresh_seconds)),
            asyncio.create_task(self.admission.maintain(self.settings.lease_renew_seconds)),
            asyncio.create_task(self._sweep(self.settings.lease_renew_seconds)),
        ]

    async def _settle_spooled(self, rows: list[dict[str, Any]]) -> None:
        """Rows this process spooled, their cost taken from this process's lease."""
        await self.store.settle_many(rows, self.admission.holder)

    async def _check_secret_key(self) -> None:
        """Refuse to serve with a secret key that does not open the stored ChatGPT tokens:
        every request would fail on those accounts, and a changed key is an operator's slip."""
        if self.refresher is None:
            return
        chatgpt = [a for a in self.catalog.accounts if a.kind == KIND_CHATGPT]
        closed = [a.name for a in chatgpt if not await self.refresher.opens(a.id)]
        if closed:
            raise CredentialError(
                "the secret key does not open the stored tokens of ChatGPT account(s) "
                f"{', '.join(closed)}; start with the key they were imported with, or import "
                "them again with --replace"
            )

    def _warn_of_keys_in_clear(self) -> None:
        """Say once, at start, which upstream API keys the database holds in clear, and how
        to seal them. The sandbox account's placeholder key is no secret."""
        names = [
            account.name
            for account in self.catalog.accounts
            if account.kind == KIND_OPENAI
            and account.api_key_sealed is None
            and (account.name, account.api_key) != (SANDBOX_ACCOUNT, SANDBOX_KEY)
        ]
        if not names:
            return
        fix = "run `codex-gateway accounts seal` with this gateway's secret key to seal them"
        if self.cipher is None:
            fix = SEAL_ONCE_THE_GATEWAY_HAS_THE_KEY
        self._advise(
            "the API keys of upstream accounts %s are stored unsealed in the database; %s",
            ", ".join(names),
            fix,
        )

    def _advise(self, message: str, *args: object) -> None:
        """Warn about what every worker of a `serve --workers N` shares (the database, its
        accounts, the journal folder): the first worker says it, the others leave it out.
        What concerns a worker's own state is logged by each worker."""
        if self.advises:
            log.warning(message, *args)

    async def recover_journals(self) -> None:
        """Settle or release the holds of gateway processes that died with holds open."""
        recovered = await recover(self.settings.journal_path, self.store, self.journal.database)
        for lock in set(recovered.foreign) - self._foreign_journals:
            self._advise("left the hold journal %s alone: it is of another database", lock)
        self._foreign_journals.update(recovered.foreign)
        if recovered.journals:
            self.metrics.recovered(len(recovered.settled), len(recovered.released))

    async def _sweep(self, interval: float) -> None:
        """Replay the spool once the database takes rows again, and recover dead processes'
        journals; whatever fails stays on disk for the next round."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.spool.replay(self._settle_spooled)
                await self.recover_journals()
            except Exception:
                log.warning("replaying the spool or a hold journal failed", exc_info=True)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Let a catalog poll or lease renewal caught mid-query unwind while the database is
        # still there: one left to the loop's final cancel waits on a disposed pool for ever.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._relays_done()
        await self.settler.drain()
        if self.writer is not None:
            await self.writer.close()
        self.journal.close()
        await self.admission.close()
        if self.grants is not None:
            await self.grants.close()
        await self.pool.drain()
        await self.quotas.drain()
        await self.router.stickiness.close()
        await self.readiness.close()
        await self.client.close()
        await self.engine.dispose()

    async def _relays_done(self, limit: float = 10.0) -> None:
        """Give relays cancelled at the grace limit time to hand in their bills."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def settle(self, outcome: Outcome) -> None:
        """Price the request and queue its usage row and debit for the writer."""
        if cut_by_shutdown(self._loop):
            outcome.flag(FLAG_CANCELLED)
            if not outcome.usage_reported:
                outcome.status = FLAG_CANCELLED
        trace = outcome.key_id is not None and outcome.key_id in self.catalog.traced_keys
        row = bill(outcome, self.catalog.prices, trace)
        self.journal.captured(row)
        self.metrics.settled(
            row, self.catalog.account_name(outcome.account_id), outcome.overhead_ms
        )
        if self.forced:
            self._spool(row)
            self.journal.settled(row["request_id"])
            return
        self.settler.submit(row, self.admission.billed(row, Hold(outcome.hold, outcome.key_hold)))

    def _settled(self, row: dict[str, Any], hold: Hold, result: Settled | None) -> None:
        """The writer is done with a row: in the database, or in the spool (`result` None)."""
        self.admission.settled(row, hold, result)
        self.journal.settled(row["request_id"])

    def force(self) -> int:
        """Exit without waiting for the database: every bill not yet written goes to the spool.

        A row the writer commits after all is skipped when the spool is replayed; the holds of
        this process's lease lapse with it. Returns how many bills went to the spool.
        """
        self.forced = True
        rows = self.settler.abandon()
        for row in rows:
            self._spool(row)
            self.journal.settled(row["request_id"])
        return len(rows)

    def _spool(self, row: dict[str, Any]) -> None:
        self.spool.append(row)
        self.metrics.spooled.inc()
