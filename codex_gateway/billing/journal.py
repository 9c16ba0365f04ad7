"""A per-process journal of the holds it placed, so that a crash leaves no hold open.

Each gateway process appends three kinds of line to its own journal: a hold opened (request,
user, key, amounts), the request's usage row as soon as it is billed (before the batch writer
takes it), and the request settled. The lines of one pass of the event loop go to the operating
system together, with one `write` at the end of that pass, and no fsync: a killed process
(even kill -9) loses at most the lines of the pass it was killed in, as if it had died at the
end of the pass before, because the kernel still has the bytes; only a power loss of the
machine can lose more. The journal is rewritten as a short checkpoint of
the holds still open whenever it grows past a size, so it stays small.

A live process holds a lock on its journal. `recover` takes the journals whose lock is free,
that is whose process is gone: a hold with a usage row is settled from it (settlement is keyed
by request id, so a row already written is not charged twice); a hold without one is released
and gets a usage row flagged `interrupted` that costs nothing. Then the dead process's leases
go back to their owners at once instead of after the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from codex_gateway.billing.admission import Hold
from codex_gateway.billing.spool import decode_row, of_another_database
from codex_gateway.store.queries import Store
from codex_gateway.store.tables import STATUS_INTERRUPTED
from codex_gateway.store.types import json_decimal

log = logging.getLogger(__name__)

SEGMENT_BYTES = 8 * 1024 * 1024
# What a lock file holds at most: the holder's name and the database's identity.
LOCK_FILE_BYTES = 4096
FLAG_INTERRUPTED = "interrupted"
INTERRUPTED_MESSAGE = (
    "The gateway process serving this request stopped before the request's usage was "
    "recorded, so its hold was released and nothing was charged."
)


class HoldJournal:
    """This process's journal: `<dir>/<holder>.lock` and segments `<holder>.<n>.jsonl`. The
    lock file names the holder and the database (`Store.database_id`) the holds are in."""

    def __init__(
        self,
        directory: Path,
        holder: str,
        segment_bytes: int = SEGMENT_BYTES,
        database: str = "",
    ):
        self.directory = directory
        self.holder = holder
        self.database = database
        self._stem = _file_stem(holder)
        self._segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._number = 0
        self._size = 0
        # The size of the checkpoint the current segment starts with: a segment is rotated
        # only once it has grown by a whole segment beyond it, so rotating stays cheap even
        # when many holds are open (each rotation rewrites them all).
        self._checkpoint = 0
        # The lines of every hold still open, to start the next segment with.
        self._open: dict[str, list[bytes]] = {}
        # Lines of this pass of the event loop, written together when it ends.
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.directory / f"{self._stem}.lock"
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"{self.holder}\n{self.database}".encode())
        os.fsync(self._lock_fd)
        self._next_segment()

    @property
    def open_holds(self) -> int:
        return len(self._open)

    def opened(self, request_id: str, hold: Hold, row: dict[str, Any]) -> None:
        """A hold was placed; `row` is what is known of the request (see interrupted_row)."""
        record = {"e": "open", "id": request_id, "hold": hold.user, "key_hold": hold.key}
        line = _line({**record, "row": row})
        self._open[request_id] = [line]
        self._write(line)

    def captured(self, row: dict[str, Any]) -> None:
        """The request's usage row, billed and about to go to the writer."""
        lines = self._open.get(row["request_id"])
        line = _line({"e": "usage", "id": row["request_id"], "row": row})
        if lines is not None:
            lines.append(line)
        self._write(line)

    def settled(self, request_id: str) -> None:
        """The row is in the database (or in the fsynced spool): the hold is over."""
        if self._open.pop(request_id, None) is None:
            return
        self._write(_line({"e": "done", "id": request_id}))
        if self._size > self._checkpoint + self._segment_bytes:
            self._next_segment()

    def close(self) -> None:
        """Stop journaling; with no hold open the files go, else they stay for recovery."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is None:
            return
        if not self._open:
            for path in self._segments():
                path.unlink(missing_ok=True)
            (self.directory / f"{self._stem}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            return
        self._pending.append(line)
        self._size += len(line)
        if self._flush_scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # called outside an event loop: nothing to wait for
            self.flush()
            return
        self._flush_scheduled = True

    def flush(self) -> None:
        """Hand the lines written so far to the operating system. Lines the system refuses
        (a full disk, say) are kept, logged, and tried again with the next line written."""
        self._flush_scheduled = False
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self._pending[:] = [data]
            log.error("could not write the hold journal; will try again: %s", exc)
            return
        self._pending.clear()

    def _next_segment(self) -> None:
        """Start a new segment with the holds still open, then drop the older ones."""
        self.flush()
        self._number += 1
        path = self.directory / f"{self._stem}.{self._number}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        checkpoint = b"".join(line for lines in self._open.values() for line in lines)
        if checkpoint:
            os.write(fd, checkpoint)
        old, self._fd, self._size = self._fd, fd, len(checkpoint)
        self._checkpoint = len(checkpoint)
        if old is not None:
            os.close(old)
        for segment in self._segments():
            if segment != path:
                segment.unlink(missing_ok=True)

    def _segments(self) -> list[Path]:
        return segments(self.directory, self._stem)


def _file_stem(holder: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in holder)


def segments(directory: Path, stem: str) -> list[Path]:
    """A journal's segments, oldest first."""
    found = directory.glob(f"{stem}.*.jsonl")
    return sorted(found, key=lambda path: int(path.name[len(stem) + 1 : -len(".jsonl")]))


def _line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, default=json_decimal) + b"\n"


@dataclass
class OpenHold:
    request_id: str
    known: dict[str, Any]
    usage: dict[str, Any] | None = None


@dataclass
class Recovered:
    """What one recovery sweep did."""

    journals: int = 0
    settled: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    # Lock files of dead processes' journals of another database, left alone.
    foreign: list[str] = field(default_factory=list)


def read_journal(paths: list[Path]) -> list[OpenHold]:
    """The holds a journal leaves open, in the order they were placed."""
    holds: dict[str, OpenHold] = {}
    for path in paths:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                # A line cut off by the crash; the lines before it are whole.
                log.warning("journal %s line %d is cut off; skipped", path, number)
                continue
            request_id = record["id"]
            if record["e"] == "open":
                holds.setdefault(request_id, OpenHold(request_id, record["row"]))
            elif record["e"] == "usage" and request_id in holds:
                holds[request_id].usage = decode_row(record["row"])
            elif record["e"] == "done":
                holds.pop(request_id, None)
    return list(holds.values())


def interrupted_row(known: dict[str, Any]) -> dict[str, Any]:
    """The usage row of a request whose usage was never recorded: it costs nothing."""
    zero = Decimal(0)
    return {
        "request_id": known["request_id"],
        "started_at": datetime.fromisoformat(known["started_at"]),
        "user_id": known["user_id"],
        "key_id": known.get("key_id"),
        "account_id": None,
        "endpoint": known["endpoint"],
        "model": known["model"],
        "upstream_model": None,
        "stream": known["stream"],
        "status": STATUS_INTERRUPTED,
        "http_status": 0,
        "error": INTERRUPTED_MESSAGE,
        "response_id": None,
        "raw_usage": None,
        "input_tokens": 0,
        "cached_tokens": 0,
        "uncached_input_tokens": 0,
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "price_model": None,
        "price_input": None,
        "price_cached_input": None,
        "price_output": None,
        "markup": None,
        "cost_uncached_input": zero,
        "cost_cached_input": zero,
        "cost_output": zero,
        "cost_before_markup": zero,
        "cost_usd": zero,
        "flags": orjson.dumps([FLAG_INTERRUPTED]).decode(),
        "duration_ms": 0.0,
        "ttfb_ms": None,
        "client_bytes": 0,
        "attempts": None,
    }


async def recover(directory: Path, store: Store, database: str = "") -> Recovered:
    """Settle or release the open holds of every journal in `directory` whose process is gone.

    A journal still locked belongs to a live process and is left alone; so is one whose
    recovery fails (the next sweep tries again, and settling twice changes nothing), and one
    of another database than `database` (`Recovered.foreign`), whose holds and bills are not
    this database's to settle. A journal that names no database (written before journals
    did) is recovered by whoever comes first, as is every journal when `database` is empty.
    """
    done = Recovered()
    if not directory.is_dir():
        return done
    for lock in sorted(directory.glob("*.lock")):
        with _unless_alive(lock) as owner:
            if owner is None:
                continue
            holder, _, its_database = owner.partition("\n")
            if of_another_database(its_database, database):
                done.foreign.append(lock.name)
                continue
            await _recover_one(directory, lock, holder, store, done)
    return done


@contextlib.contextmanager
def _unless_alive(lock: Path) -> Any:
    """Yields the journal's holder if its process is gone (then this one holds the lock)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield os.pread(fd, LOCK_FILE_BYTES, 0).decode(errors="replace") or None
    finally:
        os.close(fd)


async def _recover_one(
    directory: Path, lock: Path, holder: str, store: Store, done: Recovered
) -> None:
    paths = segments(directory, lock.name[: -len(".lock")])
    for hold in read_journal(paths):
        if hold.usage is not None:
            await store.settle(hold.usage, holder)
            done.settled.append(hold.request_id)
        else:
            await store.settle(interrupted_row(hold.known), holder)
            done.released.append(hold.request_id)
    await store.release_holder(holder)
    for path in paths:
        path.unlink()
    lock.unlink()
    done.journals += 1
    log.info(
        "recovered the hold journal of %s: %d settled from their usage, %d released",
        holder,
        len(done.settled),
        len(done.released),
    )
