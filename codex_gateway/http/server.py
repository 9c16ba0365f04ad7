"""The HTTP server's shutdown rules: SIGTERM drains, a second SIGTERM ends at once.

On the first SIGTERM (or SIGINT) the server stops accepting and lets requests in flight
finish within `shutdown_grace_seconds`; their bills settle as each one ends. Then it cancels
what still runs, and a cut stream ends with an `error` event saying the gateway is shutting
down (the relay handles the cancellation; see `end_cut_stream`), and the process exits 0:
stopping on request is not a failure, and uvicorn's line about the cancelling is logged as a
warning rather than the error uvicorn makes it (`OrderlyCancel`). A second signal stops
waiting: bills still to be written go to the spool file, which the next start replays, and
the process exits 128 plus the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a process that signal ended, so that a supervisor can tell a cut drain from a clean
one.

Once started, the server tunes the interpreter for one busy event loop beside the usage
writer's threads. What start-up built, and lives as long as the process, is frozen out of the
garbage collector's full passes, which would otherwise walk all of it with every request
waiting. The youngest generation is collected after 20,000 new objects instead of 700: a
request leaves a few dozen objects behind for a while, so at the default the collector ran
about every 20 requests and each pass walked what the requests in flight held (at c=64, about
5 % of the process's time, and a fifth fewer requests a second). The switch interval drops
from 5 ms to 0.1 ms: a thread waiting for the interpreter gets it when the holder lets go or
the interval runs out. A busy loop seldom lets go, so with 5 ms the writer waited that long
at every step of a batch; and the request loop, woken while the writer ran Python, waited
out the interval before it could answer (on a quiet SQLite gateway at c=1, the slowest 1 % of
streams got their first event 1.5 to 1.7 ms after the request at 0.5 ms, 1.0 to 1.3 ms at
0.1 ms; see docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

log = logging.getLogger(__name__)

SWITCH_INTERVAL_SECONDS = 0.0001
# New objects between two collections of the youngest generation (the interpreter's default
# is 700); the older generations keep their default rhythm relative to it.
YOUNG_GENERATION_THRESHOLD = 20_000
# A process that a signal cut short exits with this plus the signal's number.
SIGNAL_EXIT_BASE = 128
# uvicorn's line, on its `uvicorn.error` logger, when the grace period ends with requests
# still running (`uvicorn.Server.shutdown`).
UVICORN_LOGGER = "uvicorn.error"
CANCEL_LINE = "Cancel %s running task(s), timeout graceful shutdown exceeded"


class OrderlyCancel(logging.Filter):
    """uvicorn logs the cancelling of requests still running when the grace period ends at
    ERROR. For the gateway that is an orderly shutdown, not a fault: each cut request ends
    with an error its client can read, is billed, and is logged at WARNING. So that line is
    a WARNING too; every other record passes as it came."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == CANCEL_LINE and record.levelno == logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class GracefulServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        gateway: Gateway,
        on_started: Callable[[], None] | None = None,
    ):
        super().__init__(config)
        self.gateway = gateway
        self.on_started = on_started  # called once the gateway has started and listens
        self.forced_by: int | None = None  # the signal that cut the drain short

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            gc.collect()
            gc.freeze()
            gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
            sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
            if self.on_started is not None:
                self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        orderly = OrderlyCancel()
        uvicorn_log = logging.getLogger(UVICORN_LOGGER)
        uvicorn_log.addFilter(orderly)
        try:
            await super().shutdown(sockets)
        finally:
            uvicorn_log.removeFilter(orderly)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not passed on to uvicorn, which would re-raise the signal after a clean shutdown
        # and so turn exit status 0 into death by SIGTERM; `exit_status` says how it ended.
        if not self.should_exit:
            log.info("signal %d: draining %d request(s) in flight", sig, self.gateway.in_flight)
            self.should_exit = True
            return
        spooled = self.gateway.force()
        log.warning(
            "signal %d again: exiting now; %d bill(s) waiting to be written went to the spool, "
            "and the %d request(s) in flight spool theirs as they end",
            sig,
            spooled,
            self.gateway.in_flight,
        )
        self.forced_by = sig
        self.force_exit = True

    def exit_status(self) -> int:
        """0 after a clean drain, 128 + N after signal N cut it short, 1 if it never started."""
        if self.forced_by is not None:
            return SIGNAL_EXIT_BASE + self.forced_by
        return 0 if self.started else 1
