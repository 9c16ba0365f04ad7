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
from typing import Any

import orjson

from codex_gateway.store.tables import UsageRecord
from codex_gateway.store.types import Money

log = logging.getLogger(__name__)

_DECIMAL_COLUMNS = frozenset(
    column.name for column in UsageRecord.__table__.columns if isinstance(column.type, Money)
)
_TIME_COLUMNS = frozenset({"started_at"})


class Spool:
    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the spool for this process: the workers of `serve --workers` share one file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and flush it to disk before returning."""
        line = orjson.dumps(row, default=_encode) + b"\n"
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.warning(
            "usage row spooled to %s", self.path, extra={"request_id": row.get("request_id")}
        )

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(_decode(orjson.loads(line)))
            except (orjson.JSONDecodeError, ValueError, TypeError):
                # A line cut off by a crash mid-write; the rest of the file is still good.
                log.error("spool %s line %d is not a usage row; skipped", self.path, number)
        return rows

    async def replay(self, settle: Callable[[dict[str, Any]], Awaitable[object]]) -> int:
        """Settle every spooled row; rows the database still refuses stay in the file.

        Returns how many were settled. One bad row never keeps the gateway from starting.
        """
        with self._locked():
            rows = self.rows()
            if not rows:
                return 0
            kept = []
            for row in rows:
                try:
                    await settle(row)
                except Exception:
                    log.error(
                        "spooled usage row still not settled; kept in %s",
                        self.path,
                        exc_info=True,
                        extra={"request_id": row.get("request_id")},
                    )
                    kept.append(row)
            self._rewrite(kept)
        log.info("replayed %d spooled usage row(s) from %s", len(rows) - len(kept), self.path)
        return len(rows) - len(kept)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with `rows` in one rename, so a crash leaves the old or the new."""
        if not rows:
            self.path.unlink()
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_bytes(b"".join(orjson.dumps(row, default=_encode) + b"\n" for row in rows))
        os.replace(partial, self.path)


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _decode(data: dict[str, Any]) -> dict[str, Any]:
    for name in _DECIMAL_COLUMNS & data.keys():
        if data[name] is not None:
            data[name] = Decimal(data[name])
    for name in _TIME_COLUMNS & data.keys():
        if data[name] is not None:
            data[name] = datetime.fromisoformat(data[name])
    return data
