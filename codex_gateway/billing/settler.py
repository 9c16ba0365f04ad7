"""Writes usage rows and debits off the relay's path, many to a transaction.

A request hands its finished row to `submit` and returns at once; one writer task commits
queued rows in batches, so a burst of requests costs one commit rather than one each. Each
row is still settled exactly once, keyed by its request id, and its cost is taken out of
this process's balance lease. `drain` waits until every submitted row is written; the
gateway calls it before it stops. Rows the database still refuses after the retries go to
`on_unwritten` (the gateway's spool), and `abandon` hands over every row not yet written when
the process cannot wait.

`keep_up` paces new requests while the writer falls behind, and holds them back while it is
far behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from codex_gateway.billing.admission import NO_HOLD, Hold
from codex_gateway.store.db import error_line
from codex_gateway.store.queries import Settled

log = logging.getLogger(__name__)

# How long the writer waits after the first row of a batch for others to join it.
WRITE_LINGER_SECONDS = 0.02
MAX_BATCH = 500
# Written rows reported between two turns of the event loop.
REPORT_SLICE = 32
RETRY_DELAYS = (0.2, 1.0, 3.0)
# How long at most a request waits for a writer that is far behind (a database that hangs
# must not stop the requests: their bills wait in memory). A writer at low priority
# (`store/thread.py`) gets the CPU the request loop leaves idle, and the wait makes a loop that
# never idles leave some.
BACKLOG_WAIT_SECONDS = 1.0
# For a writer at low priority, past a quarter of the backlog limit, one request in
# PACE_EVERY waits PACE_SECONDS. Such a writer runs only while the request loop is idle, and
# a loop kept busy by one fast client is seldom idle: the backlog then grew to the limit, and
# requests waited tens of milliseconds while the writer caught up. Paced, the writer gets a
# millisecond every few dozen requests, and the backlog seldom reaches the limit.
PACE_EVERY = 48
PACE_SECONDS = 0.001

# Called once per row with the holds the request had and what settling did (None when the row
# could not be written and went to `on_unwritten`).
OnSettled = Callable[[dict[str, Any], Hold, Settled | None], None]


class SettlesMany(Protocol):
    """A `Store`, or a `StoreThread` that runs the same statements on a thread of its own."""

    async def settle_many(
        self, records: list[dict[str, Any]], holder: str | None = None
    ) -> list[Settled]: ...


class Settler:
    def __init__(
        self,
        store: SettlesMany,
        holder: str | None,
        on_settled: OnSettled,
        on_unwritten: Callable[[dict[str, Any]], None] | None = None,
        backlog_limit: int = 2 * MAX_BATCH,
        on_behind: Callable[[bool], None] | None = None,
        on_pace: Callable[[], None] | None = None,
    ):
        """`on_pace`: for a writer at low priority, called for each request paced to give it
        time (see PACE_EVERY); None paces nobody."""
        self._store = store
        self._holder = holder
        self._on_settled = on_settled
        self._on_unwritten = on_unwritten
        self._backlog_limit = backlog_limit
        self._queue: asyncio.Queue[tuple[dict[str, Any], Hold]] = asyncio.Queue()
        self._writing: list[tuple[dict[str, Any], Hold]] = []
        self._worker: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        # Set while a batch waits to be tried again, and from a wait that timed out until a
        # batch is done: waiting for the writer would not help.
        self._retrying = False
        self._stalled = False
        # Told True when requests begin to wait for the writer, False once it has caught up.
        self._on_behind = on_behind
        self._behind = False
        self._on_pace = on_pace
        self._pace_from = max(1, backlog_limit // 4)
        # Requests since the last one paced.
        self._unpaced = 0
        # The writer lets more rows arrive before a batch while fewer than this wait; not
        # while requests are paced for it, which would give it time it spends waiting.
        self._linger_below = min(MAX_BATCH, self._pace_from + 1 if on_pace else backlog_limit)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run())

    def submit(self, row: dict[str, Any], hold: Hold = NO_HOLD) -> None:
        self._queue.put_nowait((row, hold))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def keep_up(self) -> bool:
        """Return at once unless more than `backlog_limit` rows wait for a writer that is
        writing; then wait until half of that is left, or `BACKLOG_WAIT_SECONDS` have passed.
        Whether it waited. After a wait that ran out, nobody waits until a batch is done: a
        writer stuck on a database that does not answer is not helped by waiting. Below the
        limit, a writer at low priority past a quarter of it has requests paced (PACE_EVERY),
        which is no wait for it to catch up."""
        backlog = self._queue.qsize()
        if backlog <= self._pace_from:
            self._unpaced = 0
            return False
        if self._retrying or self._stalled or not self._writer_alive():
            return False
        if backlog <= self._backlog_limit:
            await self._pace()
            return False
        self._caught_up.clear()
        self._say_behind(True)
        try:
            async with asyncio.timeout(BACKLOG_WAIT_SECONDS):
                await self._caught_up.wait()
        except TimeoutError:
            self._stalled = True
        return True

    async def _pace(self) -> None:
        if self._on_pace is None:
            return
        self._unpaced += 1
        if self._unpaced < PACE_EVERY:
            return
        self._unpaced = 0
        self._on_pace()
        await asyncio.sleep(PACE_SECONDS)

    def _writer_alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def abandon(self) -> list[dict[str, Any]]:
        """Every row not reported settled yet: what is left of the batch being gathered,
        written or reported (a row already written is skipped when the spool is replayed), then the
        rows queued."""
        rows = [row for row, _ in self._writing]
        while not self._queue.empty():
            rows.append(self._queue.get_nowait()[0])
            self._queue.task_done()
        self._caught_up.set()
        return rows

    async def drain(self) -> None:
        """Write everything submitted so far, then stop the writer."""
        await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._caught_up.set()

    async def _run(self) -> None:
        try:
            await self._write_batches()
        finally:
            self._caught_up.set()

    async def _write_batches(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Set before the linger, so that a forced exit (`abandon`) hands this row over too.
            self._writing = batch
            if self._queue.qsize() < self._linger_below:
                # Let a few more rows arrive: at low concurrency one write per request would
                # cost the event loop more than the requests themselves.
                await asyncio.sleep(WRITE_LINGER_SECONDS)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                self._writing = []
                for _ in batch:
                    self._queue.task_done()
                self._stalled = False
                if self._queue.qsize() <= self._backlog_limit // 2:
                    self._caught_up.set()
                    self._say_behind(False)

    def _say_behind(self, behind: bool) -> None:
        if behind != self._behind:
            self._behind = behind
            if self._on_behind is not None:
                self._on_behind(behind)

    async def _write(self, batch: list[tuple[dict[str, Any], Hold]]) -> None:
        rows = [row for row, _ in batch]
        for delay in (*RETRY_DELAYS, None):
            try:
                results = await self._store.settle_many(rows, self._holder)
                break
            except Exception as error:
                if delay is None:
                    self._lost(batch)
                    return
                log.warning("usage write failed (%s); retrying in %.1fs", error_line(error), delay)
                log.debug("usage write failure in full", exc_info=True)
                self._retrying = True
                self._caught_up.set()
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._retrying = False
        await self._report(batch, results)

    async def _report(
        self, batch: list[tuple[dict[str, Any], Hold]], results: list[Settled]
    ) -> None:
        """Hand each written row to `on_settled`, REPORT_SLICE rows at a time with a turn of
        the event loop between slices, so that requests are not kept waiting for a whole
        batch's bookkeeping (a few microseconds a row, milliseconds for a large batch)."""
        for start in range(0, len(batch), REPORT_SLICE):
            if start:
                await asyncio.sleep(0)
            end = start + REPORT_SLICE
            for (row, hold), result in zip(batch[start:end], results[start:end], strict=True):
                self._on_settled(row, hold, result)
            self._writing = batch[end:]

    def _lost(self, batch: list[tuple[dict[str, Any], Hold]]) -> None:
        for row, hold in batch:
            log.error(
                "could not write usage row %s: %r",
                row["request_id"],
                row,
                extra={"request_id": row["request_id"]},
            )
            if self._on_unwritten is not None:
                self._on_unwritten(row)
            self._on_settled(row, hold, None)
