"""Writes usage rows and debits off the relay's path, many to a transaction.

A request hands its finished row to `submit` and returns at once; one writer task commits
queued rows in batches, so a burst of requests costs one commit rather than one each. Each
row is still settled exactly once, keyed by its request id. `drain` waits until every
submitted row is written; the gateway calls it before it stops. Rows the database refuses go
to `on_unwritten` (the gateway's spool), and `abandon` hands over every row not yet written
when the process cannot wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from codex_gateway.store.queries import Store

log = logging.getLogger(__name__)

MAX_BATCH = 200


class Settler:
    def __init__(
        self,
        store: Store,
        on_balance: Callable[[int, Decimal], None],
        on_unwritten: Callable[[dict[str, Any]], None] | None = None,
    ):
        self._store = store
        self._on_balance = on_balance
        self._on_unwritten = on_unwritten
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writing: list[dict[str, Any]] = []
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    def submit(self, row: dict[str, Any]) -> None:
        self._queue.put_nowait(row)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def abandon(self) -> list[dict[str, Any]]:
        """Every row not known to be written: the batch being written, then those queued."""
        rows = list(self._writing)
        while not self._queue.empty():
            rows.append(self._queue.get_nowait())
            self._queue.task_done()
        return rows

    async def drain(self) -> None:
        """Write everything submitted so far, then stop the writer."""
        await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._writing = batch
            try:
                await self._write(batch)
            finally:
                self._writing = []
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            balances = await self._store.settle_many(batch)
        except Exception:
            for row in batch:
                log.error(
                    "could not write usage row %s: %r",
                    row["request_id"],
                    row,
                    exc_info=True,
                    extra={"request_id": row["request_id"]},
                )
                if self._on_unwritten is not None:
                    self._on_unwritten(row)
            return
        for user_id, balance in balances.items():
            self._on_balance(user_id, balance)
