"""Socket writes of a busy turn of the event loop, sent together at the start of the next.

Every write to a loopback socket wakes the process reading the other end, and when that
process sleeps on another core the wake-up costs more than the write itself (on a virtual
machine, a round trip through the hypervisor). A gateway serving many requests at once wrote
each answer, and each upstream request, the moment it was ready, spread over the turn, so
its peers were woken again and again. Now only the first write of a turn goes out at once;
the turn's other writes are held and go out back to back when the next turn starts, while
their readers are still awake. A turn that follows one with several held writes holds its
first write too. A lone request therefore never waits: each of its writes is the first of
its turn.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Holder(Protocol):
    """Something that holds bytes back for the coalescer and sends them when told."""

    def flush(self) -> bool:
        """Send what is held; whether anything was."""
        ...


class WriteCoalescer:
    """One per event loop (`Gateway.writes`), shared by the server and the upstream client."""

    __slots__ = ("_busy", "_due", "_scheduled", "_wrote")

    def __init__(self) -> None:
        self._due: list[Holder] = []
        self._scheduled = False
        # A write went out at once in this turn: the turn's other writes wait.
        self._wrote = False
        # The previous turn held more than one write: this one holds its first too.
        self._busy = False

    def may_write_now(self) -> bool:
        """Whether a write may go out at once; if not, the caller holds it and calls `hold`."""
        self._schedule()
        if self._wrote or self._busy:
            return False
        self._wrote = True
        return True

    def hold(self, holder: Holder) -> None:
        """Have `holder.flush()` called when the next turn starts."""
        self._schedule()
        self._due.append(holder)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        due, self._due = self._due, []
        self._scheduled = self._wrote = False
        sent = 0
        for holder in due:
            sent += holder.flush()
        self._busy = sent > 1
