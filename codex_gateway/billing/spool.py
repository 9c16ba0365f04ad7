"""Usage rows that could not reach the database, kept in a local append-only file.

One JSON object a line, written and flushed before the process goes on, so a forced exit or
a database outage loses no bill. The next start replays the file; settlement is keyed by
request id, so a row that did reach the database before is not charged twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from codex_gateway.store.db import error_line
from codex_gateway.store.tables import UsageRecord
from codex_gateway.store.types import Money, json_decimal

log = logging.getLogger(__name__)

_DECIMAL_COLUMNS = frozenset(
    column.name for column in UsageRecord.__table__.columns if isinstance(column.type, Money)
)
_TIME_COLUMNS = frozenset({"started_at"})
# The key a spooled line names its database under (`Store.database_id`).
DATABASE_KEY = "spooled_for"
# Rows a replay hands to `settle_many` at a time: one transaction each instead of one a row.
REPLAY_BATCH = 500

SettleMany = Callable[[list[dict[str, Any]]], Awaitable[object]]


def of_another_database(named: str, ours: str) -> bool:
    """Whether a spooled line or a hold journal that names the database `named` belongs to
    another than `ours`. One that names none (written before they did) belongs to whoever
    finds it, and so does everything to a caller that names none."""
    return bool(named and ours and named != ours)


class Spool:
    """The workers of `serve --workers` share one spool: appends take a short lock on a file
    beside it, and one replay at a time runs (the others find it busy and leave it).

    Each line names the database its row is for; a replay settles only its own database's
    rows and keeps the others' (gateways of different databases that share a spool file)."""

    def __init__(self, path: Path, database: str = ""):
        self.path = path
        self.database = database

    @contextlib.contextmanager
    def _lock(self, suffix: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the lock file `PATH<suffix>`; yields False when `wait` is off and it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + suffix), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and flush it to disk before returning."""
        record = {**row, DATABASE_KEY: self.database} if self.database else row
        line = orjson.dumps(record, default=json_decimal) + b"\n"
        with self._lock(".lock"):
            _append_durably(self.path, line)
        log.warning(
            "usage row spooled to %s", self.path, extra={"request_id": row.get("request_id")}
        )

    def rows(self) -> list[dict[str, Any]]:
        """This database's rows in the spool."""
        if not self.path.exists():
            return []
        return [row for row, _ in self._parse(self.path.read_bytes()).own]

    def _parse(self, data: bytes) -> _Lines:
        """The lines of `data`: this database's rows (each with its line as written), the
        lines that are not rows, and the lines of other databases' rows."""
        lines = _Lines([], [], [])
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                database = record.pop(DATABASE_KEY, "")
                if of_another_database(database, self.database):
                    lines.foreign.append(line)  # decoded by its own database's gateway
                    continue
                row = decode_row(record)
            except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
                # A line cut off by a crash mid-write, or not a row at all; the rest of the
                # file is still good.
                log.error("spool %s line %d is not a usage row; skipped", self.path, number)
                lines.bad.append(line)
                continue
            lines.own.append((row, line))
        return lines

    def _reject(self, lines: list[bytes]) -> None:
        """Keep lines that are not rows beside the spool, for an operator to look at."""
        rejected = self.path.with_name(self.path.name + ".rejected")
        _append_durably(rejected, b"".join(line + b"\n" for line in lines))
        log.error("%d spool line(s) that are not usage rows kept in %s", len(lines), rejected)

    async def replay(self, settle_many: SettleMany) -> int:
        """Settle every spooled row of this database; rows the database still refuses, and
        other databases' rows, stay in the file as they were written.

        REPLAY_BATCH rows go to `settle_many` in one call; a batch the database refuses is
        tried again a row a call, so that one bad row holds up no other.
        Returns how many were settled. One bad row never keeps the gateway from starting.
        Rows appended while the replay waits on the database are kept. The append lock is
        never held across a wait, so a worker spooling a row is not held up by a replay.
        """
        with self._lock(".replay", wait=False) as mine:
            if not mine or not self.path.exists():
                return 0
            with self._lock(".lock"):
                read = self.path.read_bytes()
            lines = self._parse(read)
            if lines.bad:
                self._reject(lines.bad)
            kept = list(lines.foreign)
            for start in range(0, len(lines.own), REPLAY_BATCH):
                batch = lines.own[start : start + REPLAY_BATCH]
                if len(batch) > 1 and await self._settled_at_once(settle_many, batch):
                    continue
                kept.extend(await self._settle_one_by_one(settle_many, batch))
            settled = len(lines.own) + len(lines.foreign) - len(kept)
            if settled or lines.bad:
                with self._lock(".lock"):
                    self._rewrite(kept, self.path.read_bytes()[len(read) :])
        if settled:
            log.info("replayed %d spooled usage row(s) from %s", settled, self.path)
        return settled

    @staticmethod
    async def _settled_at_once(
        settle_many: SettleMany, batch: list[tuple[dict[str, Any], bytes]]
    ) -> bool:
        try:
            await settle_many([row for row, _ in batch])
        except Exception as error:
            log.warning(
                "a batch of %d spooled usage rows was refused (%s); settling them one by one",
                len(batch),
                error_line(error),
            )
            log.debug("spooled batch refusal in full", exc_info=True)
            return False
        return True

    async def _settle_one_by_one(
        self, settle_many: SettleMany, batch: list[tuple[dict[str, Any], bytes]]
    ) -> list[bytes]:
        """Settle each row on its own; the lines of those still refused."""
        kept = []
        for row, line in batch:
            try:
                await settle_many([row])
            except Exception as error:
                log.error(
                    "spooled usage row still not settled (%s); kept in %s",
                    error_line(error),
                    self.path,
                    extra={"request_id": row.get("request_id")},
                )
                log.debug("spooled row refusal in full", exc_info=True)
                kept.append(line)
        return kept

    def _rewrite(self, lines: list[bytes], appended: bytes) -> None:
        """Replace the file with `lines` and the bytes `appended` since it was read, in one
        rename made durable first, so a crash leaves the old or the new."""
        if not lines and not appended:
            self.path.unlink()
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.unlink(missing_ok=True)
        _append_durably(partial, b"".join(line + b"\n" for line in lines) + appended)
        os.replace(partial, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class _Lines(NamedTuple):
    own: list[tuple[dict[str, Any], bytes]]
    bad: list[bytes]
    foreign: list[bytes]


def _append_durably(path: Path, data: bytes) -> None:
    """Append `data` to `path` and flush it to disk before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def decode_row(data: dict[str, Any]) -> dict[str, Any]:
    """A usage row read back from JSON: money as Decimal, times as datetimes."""
    for name in _DECIMAL_COLUMNS & data.keys():
        if data[name] is not None:
            data[name] = Decimal(data[name])
    for name in _TIME_COLUMNS & data.keys():
        if data[name] is not None:
            data[name] = datetime.fromisoformat(data[name])
    return data
