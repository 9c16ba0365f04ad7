"""The usage writer's store on a thread of its own: same statements, same exactness."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codex_gateway.app import Gateway
from codex_gateway.billing.admission import LEASE_REQUESTS, Admission, Hold
from codex_gateway.config import Settings
from codex_gateway.http.server import SWITCH_INTERVAL_SECONDS
from codex_gateway.store import thread as thread_module
from codex_gateway.store.queries import Store
from codex_gateway.store.thread import GRANTS_POOL_SIZE, WRITER_NICENESS, StoreThread
from tests.store.test_queries import new_user, usage_row

SEED_COST = Decimal("0.114295")


async def test_rows_settled_on_the_thread_are_written_and_debited_once(
    store: Store, database_url: str
) -> None:
    name, user_id = await new_user(store, "10")
    rows = [usage_row(user_id) for _ in range(20)]
    writer = StoreThread(database_url)
    writer.start()
    try:
        first = await writer.settle_many(rows[:15])
        again = await writer.settle_many(rows[10:])
    finally:
        await writer.close()

    assert [s.balance for s in first][-1] == Decimal("10") - 15 * SEED_COST
    # The five already written are not charged again; the other five are.
    assert [s.balance is None for s in again] == [True] * 5 + [False] * 5
    assert (await store.balances())[user_id] == Decimal("10") - 20 * SEED_COST
    settles = [e for e in await store.ledger(name) if e["kind"] == "settle"]
    assert len(settles) == 20


async def test_a_batch_is_written_while_the_request_loop_is_busy(
    store: Store, database_url: str
) -> None:
    """Sixty-four tasks keep this loop busy, as requests would (work, then a wait); the
    batch's statements run on the writer's own loop and the batch is written meanwhile."""
    _, user_id = await new_user(store, "100")
    # As `serve` runs it (codex_gateway/http/server.py).
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            sum(range(2_000))
            await asyncio.sleep(0.001)

    workers = [asyncio.create_task(busy()) for _ in range(64)]
    writer = StoreThread(database_url)
    writer.start()
    try:
        settled = await asyncio.wait_for(
            writer.settle_many([usage_row(user_id) for _ in range(200)]), timeout=30
        )
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await writer.close()
        sys.setswitchinterval(previous)

    assert len(settled) == 200
    assert (await store.balances())[user_id] == Decimal("100") - 200 * SEED_COST


def writer_threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == name)


def _native_id(name: str) -> int:
    """The operating system's id of the running thread called `name`."""
    thread = next(t for t in threading.enumerate() if t.name == name)
    assert thread.native_id is not None
    return thread.native_id


async def test_closing_a_writer_that_never_started_does_nothing(database_url: str) -> None:
    writer = StoreThread(database_url, name="usage-writer-idle")

    await writer.close()

    assert writer_threads("usage-writer-idle") == 0
    with pytest.raises(RuntimeError, match="not started"):
        await writer.settle_many([])


async def test_a_writer_starts_once_and_its_thread_ends_with_close(database_url: str) -> None:
    writer = StoreThread(database_url, name="usage-writer-once")
    writer.start()
    assert writer_threads("usage-writer-once") == 1

    with pytest.raises(RuntimeError, match="already started"):
        writer.start()
    await writer.close()

    assert writer_threads("usage-writer-once") == 0


def test_a_writer_whose_database_cannot_be_opened_leaves_no_thread_behind() -> None:
    writer = StoreThread("nosuchdriver://127.0.0.1/none", name="usage-writer-broken")

    with pytest.raises(Exception, match="nosuchdriver"):
        writer.start()

    assert writer_threads("usage-writer-broken") == 0


def _policy(native_id: int) -> tuple[int, int]:
    return os.sched_getscheduler(native_id), os.getpriority(os.PRIO_PROCESS, native_id)


def _ordinary_policy_of_our_own() -> tuple[int, int]:
    ours = _policy(threading.get_native_id())
    if ours[0] != os.SCHED_OTHER or ours[1] == WRITER_NICENESS:
        pytest.skip("the tests themselves run at the lowest priority")
    return ours


LOWEST = (os.SCHED_OTHER, WRITER_NICENESS)
IDLE = (os.SCHED_IDLE, WRITER_NICENESS)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own policy is Linux's")
@pytest.mark.parametrize("lowered", [True, False])
async def test_a_lowered_writer_runs_when_the_core_is_idle_and_takes_turns_while_behind(
    store: Store, database_url: str, lowered: bool
) -> None:
    ours = _ordinary_policy_of_our_own()
    # Where the writer could not take ordinary turns again, it keeps to them throughout.
    keeping_up = IDLE if thread_module.may_leave_idle() else LOWEST
    writer = StoreThread(database_url, name="usage-writer-nice", lowered=lowered)
    writer.start()
    try:
        native_id = _native_id("usage-writer-nice")
        assert _policy(native_id) == (keeping_up if lowered else ours)
        writer.behind(True)
        assert _policy(native_id) == (LOWEST if lowered else ours)
        writer.behind(False)
        assert _policy(native_id) == (keeping_up if lowered else ours)
        assert _policy(threading.get_native_id()) == ours
        _, user_id = await new_user(store, "1")
        settled = await writer.settle_many([usage_row(user_id)])
        assert settled[0].balance == Decimal("1") - SEED_COST
    finally:
        await writer.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own policy is Linux's")
async def test_a_writer_that_could_not_leave_the_idle_policy_keeps_to_the_lowest_nice_value(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ordinary_policy_of_our_own()
    monkeypatch.setattr(thread_module, "may_leave_idle", lambda: False)
    writer = StoreThread(database_url, name="usage-writer-unprivileged", lowered=True)
    writer.start()
    try:
        native_id = _native_id("usage-writer-unprivileged")
        assert _policy(native_id) == LOWEST
        writer.behind(True)
        writer.behind(False)
        assert _policy(native_id) == LOWEST
    finally:
        await writer.close()


def _has_cap_sys_nice() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE is capability 23


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own policy is Linux's")
def test_the_right_to_leave_the_idle_policy_is_tried_on_a_thread_that_is_then_gone() -> None:
    ours = _ordinary_policy_of_our_own()

    allowed = thread_module.may_leave_idle()

    nice_limit = resource.getrlimit(resource.RLIMIT_NICE)[0]
    expected = _has_cap_sys_nice() or nice_limit == resource.RLIM_INFINITY or nice_limit >= 1
    assert allowed is expected
    assert _policy(threading.get_native_id()) == ours
    assert writer_threads("usage-writer-probe") == 0


@pytest.mark.skipif(
    sys.platform != "linux"
    or os.geteuid() != 0
    or shutil.which("setpriv") is None
    or resource.getrlimit(resource.RLIMIT_NICE)[0] != 0,
    reason="needs Linux, root to drop a capability with setpriv, and an RLIMIT_NICE of 0",
)
def test_without_cap_sys_nice_and_room_in_the_nice_limit_the_idle_policy_is_not_used() -> None:
    unprivileged = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-sys_nice",
            "--bounding-set=-sys_nice",
            sys.executable,
            "-c",
            "from codex_gateway.store.thread import may_leave_idle; print(may_leave_idle())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert unprivileged.returncode == 0, unprivileged.stderr
    assert unprivileged.stdout.strip() == "False"


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own policy is Linux's")
@pytest.mark.parametrize("alone", [True, False])
async def test_only_the_single_worker_of_a_serve_lowers_its_sqlite_writer(
    database_url: str, tmp_path: Path, alone: bool
) -> None:
    ours = _ordinary_policy_of_our_own()
    keeping_up = IDLE if thread_module.may_leave_idle() else LOWEST
    settings = Settings(database_url=database_url, spool_path=str(tmp_path / "spool.jsonl"))
    gateway = Gateway(settings, alone=alone)
    assert gateway.writer is not None
    gateway.writer.start()
    try:
        native_id = _native_id("usage-writer")
        lowered = alone and database_url.startswith("sqlite")
        assert _policy(native_id) == (keeping_up if lowered else ours)
    finally:
        await gateway.writer.close()
        await gateway.engine.dispose()


async def test_leases_grow_on_a_thread_of_their_own(
    store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant's statements run on the grants thread's loop, not on the request loop, where
    each would wait for a turn among the requests in flight; the lease is exact all the same."""
    _, user_id = await new_user(store, "10")
    ran_on: list[str] = []
    real = Store.acquire_lease

    async def recorded(self: Store, *args: Any, **kwargs: Any) -> Decimal:
        ran_on.append(threading.current_thread().name)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "acquire_lease", recorded)
    grants = StoreThread(database_url, name="lease-grants-test")
    grants.start()
    gate = Admission(store, lease_ttl=60, idle_seconds=0, grants=grants)
    try:
        hold = await gate.admit(user_id, Decimal("0.01"))
        assert [lease["amount"] for lease in await store.leases()] == [
            LEASE_REQUESTS * Decimal("0.01")
        ]
        await gate.close()
    finally:
        await grants.close()
    assert hold == Hold(Decimal("0.01"))
    assert ran_on == ["lease-grants-test"]
    assert await store.leases() == []
    problems, _ = await store.verify_ledger()
    assert problems == []


@pytest.mark.parametrize("in_memory", [False, True])
async def test_a_gateway_grows_leases_on_their_thread_but_for_an_in_memory_database(
    database_url: str, tmp_path: Path, in_memory: bool
) -> None:
    url = "sqlite:///:memory:" if in_memory else database_url
    gateway = Gateway(Settings(database_url=url, spool_path=str(tmp_path / "spool.jsonl")))
    try:
        assert (gateway.grants is None) == in_memory
        assert gateway.admission._users._grants is (gateway.grants or gateway.store)
        if gateway.grants is not None and not url.startswith("sqlite"):
            # Grants for different users run side by side on a server database.
            gateway.grants.start()
            try:
                engine = gateway.grants._store.engine  # type: ignore[union-attr]
                assert engine.pool.size() == GRANTS_POOL_SIZE  # type: ignore[attr-defined]
            finally:
                await gateway.grants.close()
    finally:
        await gateway.engine.dispose()
