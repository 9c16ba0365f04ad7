"""Socket writes of a busy turn of the event loop, sent together early in the next turn.

Every write to a loopback socket wakes the process reading the other end, and when that
process sleeps on another core the wake-up costs more than the write itself (on a virtual
machine, a round trip through the hypervisor). A gateway serving many requests at once wrote
each answer, and each upstream request, the moment it was ready, spread over the turn, so
its peers were woken again and again. Now only the first write of a turn goes out at once;
the turn's other writes are held and go out back to back early in the next turn (before any
callback queued after the turn's first write), while their readers are still awake. After a
turn in which more than one connection had writes held, the first write of the next turn is
held too, until a turn passes with at most one. A lone request does not wait: its writes
come in turns of their own, each the first of its turn.
"""

from __future__ import annotations

import asyncio
import logging
from threading import get_ident
from typing import Protocol

log = logging.getLogger(__name__)


class Holder(Protocol):
    """A connection that holds bytes back for the coalescer and sends them when told."""

    def flush(self) -> bool:
        """Send what is held; whether anything was."""
        ...


class WriteCoalescer:
    """One per gateway (`Gateway.coalescer`), shared by the server and the upstream client."""

    __slots__ = ("_busy", "_due", "_loop", "_scheduled", "_thread", "_wrote")

    def __init__(self) -> None:
        self._due: list[Holder] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the thread `_loop` runs on
        self._scheduled = False
        # A write went out at once in this turn: the turn's other writes wait.
        self._wrote = False
        # More than one connection had writes held in the previous turn.
        self._busy = False

    def may_write_now(self) -> bool:
        """Whether a write may go out at once; if not, the caller holds it and calls `hold`."""
        self._schedule()
        if self._wrote or self._busy:
            return False
        self._wrote = True
        return True

    def hold(self, holder: Holder) -> None:
        """Have `holder.flush()` called early in the next turn."""
        self._schedule()
        self._due.append(holder)

    def _schedule(self) -> None:
        # Asking for the running loop costs a system call (the interpreter checks the process
        # id each time), and a request comes here several times: a flush already queued on
        # the loop still running on this thread is all that is needed.
        loop = self._loop
        if self._scheduled and self._thread == get_ident() and loop and loop.is_running():
            return
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A flush queued on a loop that has since stopped would never run; the writes it
            # held were for that loop's connections, which are gone with it.
            self._loop, self._thread, self._due = loop, get_ident(), []
            self._scheduled = self._wrote = self._busy = False
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        due, self._due = self._due, []
        self._scheduled = self._wrote = False
        sent = 0
        for holder in due:
            try:
                sent += holder.flush()
            except Exception:  # one connection's failure must not strand the others' bytes
                log.exception("a held write could not be sent")
        self._busy = sent > 1
        if self._busy:
            self._schedule()  # so that a turn without writes ends the busy spell
