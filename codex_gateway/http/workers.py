"""`serve --workers N`: N gateway processes on one port, each with a socket of its own.

Every worker binds HOST:PORT with SO_REUSEPORT, so the kernel spreads new connections across
them, and builds its own Gateway: its own database pool, catalog, balance leases and
upstream client. Billing stays exact across them because admission holds against database
leases, as it does across separate machines. Each worker is given its index, so that only
the first (index 0) warns about what they all share. The supervisor only forwards SIGTERM and
SIGINT (each worker drains, then a second signal forces it) and waits. A worker that dies on
its own takes the others down and the supervisor exits 1, so that systemd or Docker restarts
the service whole rather than leaving it running short of a worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

# Runs one worker on the socket it is given, with its index (0 for the first); returns the
# worker's exit status.
Worker = Callable[[socket.socket, int], int]
_PR_SET_PDEATHSIG = 1


def listening_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """A socket bound to HOST:PORT, for the server to listen on; `shared`: other sockets
    with SO_REUSEPORT (the other workers) may bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def shared_socket_of_a_free_port(host: str, port: int) -> socket.socket:
    """A `listening_socket(..., shared=True)` on a port nothing else holds. SO_REUSEPORT
    alone would let it bind beside the listeners of another gateway started with `--workers`
    (or of any program that set the option), and the kernel would split the connections
    between the two; so the port is bound without it first, which fails if anything holds
    it. Port 0 becomes the port the system picked."""
    alone = listening_socket(host, port)
    try:
        port = alone.getsockname()[1]
    finally:
        alone.close()
    return listening_socket(host, port, shared=True)


def serve_workers(count: int, guard: socket.socket, worker: Worker) -> int:
    """Run `count` workers on the port of `guard` until they have all stopped; 0 when each
    one stopped cleanly, else the first non-zero status (143 when a second SIGTERM cut the
    drains short), or 1 when a worker stopped on its own.

    `guard` is a `shared_socket_of_a_free_port` the caller bound, so that a port another
    program holds fails once, before anything starts; it is held (bound, never listening) for
    the supervisor's life and closed at the end.
    """
    host, port = guard.getsockname()[:2]
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            pid = os.fork()
            if pid == 0:
                _run_child(guard, host, port, worker, index)
            children[pid] = index
        log.info("started %d workers for %s:%d: pids %s", count, host, port, list(children))
        status = 0
        while children:
            pid, code = os.wait()
            if children.pop(pid, None) is None:
                continue
            exit_code = os.waitstatus_to_exitcode(code)
            if exit_code != 0 and not status:
                status = exit_code if exit_code > 0 else 1
            if not stopping:
                log.error("worker %d stopped on its own; stopping the others", pid)
                status = 1
                forward(signal.SIGTERM, None)
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        guard.close()


def _run_child(guard: socket.socket, host: str, port: int, worker: Worker, index: int) -> None:
    """In a forked worker: its own process group (the supervisor forwards signals, so a
    Ctrl-C in a terminal arrives once, not twice), its own socket, and never a return."""
    status = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setpgid(0, 0)
        _die_with_parent()
        guard.close()
        status = worker(listening_socket(host, port, shared=True), index)
    except SystemExit as exc:
        status = 1 if exc.code else 0
    except BaseException:
        log.exception("worker %d failed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the supervisor dies, so no worker is left orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
