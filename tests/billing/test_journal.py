"""The hold journal: what a process writes, and how another recovers it once it is gone.

A journal whose lock is free stands for a process that was killed; one still locked, for a
process that is alive.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codex_gateway.billing.admission import Admission, Hold
from codex_gateway.billing.journal import HoldJournal, read_journal, recover, segments
from codex_gateway.store.queries import Store
from tests.store.test_queries import new_user, usage_row, user_named

EST = Decimal("0.3")


def known(row: dict[str, object]) -> dict[str, object]:
    """What the relay journals of a request when it places the hold."""
    fields = ("request_id", "started_at", "user_id", "key_id", "endpoint", "model", "stream")
    return {name: row[name] for name in fields}


async def crashed_process(
    store: Store,
    directory: Path,
    user_id: int,
    captured: int,
    open_only: int,
    done: int,
    database: str = "",
) -> tuple[Admission, list[str], list[str]]:
    """A process that placed holds, then died: some usage journaled, some holds bare, some
    settled. Returns its admission and the request ids it left with usage and without."""
    gate = Admission(store, lease_ttl=60, idle_seconds=60)
    journal = HoldJournal(directory, gate.holder, database=database)
    journal.start()
    with_usage, bare = [], []
    for index in range(captured + open_only + done):
        row = usage_row(user_id)
        await gate.admit(user_id, EST)
        journal.opened(row["request_id"], Hold(EST), known(row))
        if index < captured + done:
            journal.captured(row)
        if index < captured:
            with_usage.append(row["request_id"])
        elif index < captured + done:
            await store.settle(row, gate.holder)
            journal.settled(row["request_id"])
        else:
            bare.append(row["request_id"])
    journal.close()  # the lock goes with the process; the files stay (holds are open)
    return gate, with_usage, bare


async def test_a_dead_process_holds_are_settled_from_usage_or_released(
    store: Store, tmp_path: Path
) -> None:
    name, user_id = await new_user(store, "10")
    _, with_usage, bare = await crashed_process(store, tmp_path, user_id, 3, 2, 4)

    done = await recover(tmp_path, store)

    assert (done.journals, sorted(done.settled), sorted(done.released)) == (
        1,
        sorted(with_usage),
        sorted(bare),
    )
    for request_id in with_usage:
        assert (await store.usage(request_id) or {})["cost_usd"] == Decimal("0.114295")
    for request_id in bare:
        row = await store.usage(request_id) or {}
        assert (row["status"], row["cost_usd"], row["flags"]) == (
            "interrupted",
            Decimal(0),
            '["interrupted"]',
        )
    user = await user_named(store, name)
    assert user["balance"] == Decimal("10") - 7 * Decimal("0.114295")
    assert user["reserved"] == 0
    assert await store.leases() == []
    assert list(tmp_path.iterdir()) == []
    problems, _ = await store.verify_ledger()
    assert problems == []
    kinds = [entry["kind"] for entry in await store.ledger(name)]
    # the top-up, one lease granted, 7 requests settled, 2 released, the lease returned
    assert kinds == ["topup", "hold", *["settle"] * 7, *["release"] * 3]


async def test_a_journal_that_names_no_database_is_recovered(store: Store, tmp_path: Path) -> None:
    """Journals written before they named their database are still settled."""
    _, user_id = await new_user(store, "10")
    gate, with_usage, _ = await crashed_process(store, tmp_path, user_id, 2, 0, 0)
    (lock,) = tmp_path.glob("*.lock")
    lock.write_text(gate.holder)  # as such a journal's lock file was: the holder alone

    done = await recover(tmp_path, store, "5f0c3a9e2b7d4e61")

    assert sorted(done.settled) == sorted(with_usage)


async def test_a_dead_process_journal_of_another_database_is_left_to_that_database(
    store: Store, tmp_path: Path
) -> None:
    """Gateways of two databases sharing a journal folder: neither settles the other's bills
    (the user ids of one mean other users in the other)."""
    _, user_id = await new_user(store, "10")
    _, with_usage, bare = await crashed_process(
        store, tmp_path, user_id, 3, 2, 0, database="5f0c3a9e2b7d4e61"
    )
    balance = (await store.balances())[user_id]

    elsewhere = await recover(tmp_path, store, "a83d1c07e6f24b95")

    assert (elsewhere.journals, elsewhere.settled, elsewhere.released) == (0, [], [])
    assert len(elsewhere.foreign) == 1
    for request_id in with_usage + bare:
        assert await store.usage(request_id) is None
    assert (await store.balances())[user_id] == balance

    own = await recover(tmp_path, store, "5f0c3a9e2b7d4e61")

    assert (own.journals, sorted(own.settled), sorted(own.released)) == (
        1,
        sorted(with_usage),
        sorted(bare),
    )


async def test_recovering_again_after_a_partial_recovery_charges_nothing_twice(
    store: Store, tmp_path: Path
) -> None:
    name, user_id = await new_user(store, "10")
    gate, with_usage, _ = await crashed_process(store, tmp_path, user_id, 2, 1, 0)
    # A recovery that died after settling one row, before it removed the journal.
    journaled = read_journal(sorted(tmp_path.glob("*.jsonl")))
    (first,) = [hold for hold in journaled if hold.request_id == with_usage[0]]
    assert first.usage is not None
    await store.settle(first.usage, gate.holder)

    await recover(tmp_path, store)

    user = await user_named(store, name)
    assert user["balance"] == Decimal("10") - 2 * Decimal("0.114295")
    assert (await store.verify_ledger())[0] == []


async def test_a_live_process_journal_is_left_alone(store: Store, tmp_path: Path) -> None:
    _, user_id = await new_user(store, "10")
    journal = HoldJournal(tmp_path, "host:1:live")
    journal.start()
    row = usage_row(user_id)
    journal.opened(row["request_id"], Hold(EST), known(row))

    done = await recover(tmp_path, store)

    assert done.journals == 0
    assert await store.usage(row["request_id"]) is None
    journal.settled(row["request_id"])
    journal.close()
    assert list(tmp_path.iterdir()) == []


def test_a_full_segment_starts_over_with_only_the_holds_still_open(tmp_path: Path) -> None:
    journal = HoldJournal(tmp_path, "host:2:rotate", segment_bytes=2_000)
    journal.start()
    rows = [usage_row(1) for _ in range(40)]
    for number, row in enumerate(rows):
        journal.opened(row["request_id"], Hold(EST), known(row))
        if number != 7:
            journal.settled(row["request_id"])

    (segment,) = segments(tmp_path, "host_2_rotate")
    assert segment.name != "host_2_rotate.1.jsonl"
    assert [hold.request_id for hold in read_journal([segment])] == [rows[7]["request_id"]]
    lock = os.open(tmp_path / "host_2_rotate.lock", os.O_RDWR)
    try:
        # the live process keeps its journal locked
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the journal of a live process was not locked")
        except BlockingIOError:
            pass
    finally:
        os.close(lock)
    journal.close()


def test_many_open_holds_do_not_make_every_settlement_rewrite_the_journal(
    tmp_path: Path,
) -> None:
    # A backlog of open holds larger than a segment: each rotation rewrites them all, so a
    # segment must grow by a whole segment past its checkpoint before it rotates again.
    journal = HoldJournal(tmp_path, "host:4:backlog", segment_bytes=2_000)
    journal.start()
    rows = [usage_row(1) for _ in range(200)]
    for row in rows:
        journal.opened(row["request_id"], Hold(EST), known(row))
    rotations = 0
    for row in rows[:100]:
        before = segments(tmp_path, "host_4_backlog")
        journal.settled(row["request_id"])
        rotations += segments(tmp_path, "host_4_backlog") != before

    assert 0 < rotations <= 10
    (segment,) = segments(tmp_path, "host_4_backlog")
    left = [hold.request_id for hold in read_journal([segment])]
    assert left == [row["request_id"] for row in rows[100:]]
    for row in rows[100:]:
        journal.settled(row["request_id"])
    journal.close()


def one_hold(directory: Path, holder: str) -> tuple[HoldJournal, dict[str, Any]]:
    """A started journal with one hold opened in it."""
    journal = HoldJournal(directory, holder)
    journal.start()
    row = usage_row(1)
    journal.opened(row["request_id"], Hold(EST), known(row))
    return journal, row


def on_disk(directory: Path, stem: str) -> list[str]:
    """The request ids of the holds a journal's one segment leaves open."""
    (segment,) = segments(directory, stem)
    return [hold.request_id for hold in read_journal([segment])]


def test_a_line_cut_off_by_a_crash_is_skipped(tmp_path: Path) -> None:
    journal, row = one_hold(tmp_path, "host:3:cut")
    journal.close()
    (segment,) = segments(tmp_path, "host_3_cut")
    with segment.open("ab") as handle:
        handle.write(b'{"e":"open","id":"req_b","ho')

    assert on_disk(tmp_path, "host_3_cut") == [row["request_id"]]


async def test_the_lines_of_one_loop_pass_reach_the_file_in_one_write_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = HoldJournal(tmp_path, "writes-once")
    journal.start()
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    rows = [usage_row(1) for _ in range(3)]
    for row in rows:
        journal.opened(row["request_id"], Hold(EST), known(row))
        journal.captured(row)
    assert writes == [] and on_disk(tmp_path, "writes-once") == []

    await asyncio.sleep(0)

    assert len(writes) == 1
    assert on_disk(tmp_path, "writes-once") == [r["request_id"] for r in rows]
    journal.close()


def test_without_an_event_loop_each_line_is_written_at_once(tmp_path: Path) -> None:
    journal, row = one_hold(tmp_path, "no-loop")

    assert on_disk(tmp_path, "no-loop") == [row["request_id"]]
    journal.close()


async def test_closing_writes_the_lines_still_waiting_for_the_pass_to_end(tmp_path: Path) -> None:
    journal, row = one_hold(tmp_path, "closing")
    assert on_disk(tmp_path, "closing") == []

    journal.close()  # a hold is open, so the file stays for recovery

    assert on_disk(tmp_path, "closing") == [row["request_id"]]


async def test_lines_a_full_disk_refused_are_written_with_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, first = one_hold(tmp_path, "full-disk")
    real_write = os.write

    def refusing_write(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", refusing_write)
    await asyncio.sleep(0)
    assert on_disk(tmp_path, "full-disk") == []

    monkeypatch.setattr(os, "write", real_write)
    second = usage_row(1)
    journal.opened(second["request_id"], Hold(EST), known(second))
    await asyncio.sleep(0)

    assert on_disk(tmp_path, "full-disk") == [first["request_id"], second["request_id"]]
    journal.close()
