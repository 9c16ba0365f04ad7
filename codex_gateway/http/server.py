"""The HTTP server's shutdown rules: SIGTERM drains, a second SIGTERM ends at once.

On the first SIGTERM (or SIGINT) the server stops accepting and lets requests in flight
finish within `shutdown_grace_seconds`; their bills settle as each one ends. A second signal
stops waiting: bills still to be written go to the spool file, which the next start replays.
Either way the process exits 0, since stopping on request is not a failure.
"""

from __future__ import annotations

import logging
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from codex_gateway.app import Gateway

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway):
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not passed on to uvicorn, which would re-raise the signal after a clean shutdown
        # and so turn exit status 0 into death by SIGTERM.
        if not self.should_exit:
            log.info("signal %d: draining %d request(s) in flight", sig, self.gateway.in_flight)
            self.should_exit = True
            return
        log.warning(
            "signal %d again: exiting now; %d bill(s) in flight go to the spool",
            sig,
            self.gateway.in_flight,
        )
        self.gateway.force()
        self.force_exit = True
