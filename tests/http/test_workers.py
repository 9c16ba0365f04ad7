"""`serve --workers 2`: two processes on one port, each its own gateway, billing one balance.

Connections spread across the workers (each binds the port with SO_REUSEPORT); every
request is billed exactly once, and a SIGTERM to the supervisor drains both and exits 0 (143
when a second SIGTERM cuts a drain short).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    PG_ADMIN_URL,
    Gateway,
    Sandbox,
    add_sandbox_account,
    make_gateway,
    running_gateway,
)
from tests.http.test_responses import expected_cost
from tests.http.test_server import cut_the_drain
from tests.test_topology import CACHED_COUNTS, wait_for_rows

REQUESTS = 16


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def two_workers(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    yield from running_gateway(request.param, sandbox, tmp_path_factory, workers=2)


def worker_pids(gw: Gateway) -> list[int]:
    assert gw.proc is not None
    pid = gw.proc.popen.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def lease_holders(gw: Gateway, user: str) -> set[str]:
    query = (
        "SELECT DISTINCT l.holder FROM balance_leases l JOIN users u ON u.id = l.user_id "
        f"WHERE u.name = '{user}'"
    )
    if gw.backend == "sqlite":
        path = gw.database_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as connection:
            return {row[0] for row in connection.execute(query)}
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + gw.database_url.rsplit("/", 1)[1]
    done = subprocess.run(["psql", url, "-tAc", query], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_two_workers_serve_one_port_and_bill_one_balance_exactly(two_workers: Gateway) -> None:
    gw = two_workers
    assert len(worker_pids(gw)) == 2
    user, key = gw.new_user("10")
    request_ids: list[str] = []
    errors: list[BaseException] = []

    def send(stream: bool) -> None:
        try:
            # A client of its own: a new connection, which the kernel gives to either worker.
            with httpx.Client(timeout=30) as client:
                response = client.post(
                    gw.url + "/v1/responses",
                    headers={
                        "Authorization": f"Bearer {key}",
                        "x-sandbox-transcript": "responses-cached",
                    },
                    json={"model": "gpt-5.1-codex", "input": "hi", "stream": stream},
                )
            assert response.status_code == 200, response.text
            request_ids.append(response.headers["x-request-id"])
        except BaseException as exc:  # collected and re-raised on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n % 2 == 0,)) for n in range(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    rows = wait_for_rows(gw, request_ids)

    assert errors == []
    assert set(request_ids) <= rows.keys()
    # Each worker admitted requests against a balance lease of its own.
    assert len(lease_holders(gw, user)) == 2
    assert Decimal(gw.balance(user)) == Decimal(10) - REQUESTS * expected_cost(CACHED_COUNTS)
    settlements = [
        entry for entry in gw.cli_json("users", "ledger", user) if entry["kind"] == "settle"
    ]
    assert len(settlements) == REQUESTS


def test_sigterm_drains_every_worker_and_exits_0(two_workers: Gateway) -> None:
    gw = two_workers
    assert gw.proc is not None
    workers = worker_pids(gw)
    gw.proc.popen.send_signal(signal.SIGTERM)
    assert gw.proc.popen.wait(30) == 0
    assert all(gone(pid) for pid in workers)


def test_a_second_sigterm_that_cuts_a_workers_drain_exits_143(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gw = make_gateway("sqlite", tmp_path_factory)
    try:
        add_sandbox_account(gw, sandbox)
        gw.start(workers=2)

        draining, code, slow = cut_the_drain(gw, signal.SIGTERM)

        assert draining, "the drains did not wait for the stream in flight"
        assert code == 128 + signal.SIGTERM, gw.log_text()
        assert b"event: response.completed" not in slow.body
    finally:
        gw.stop()


def test_a_worker_that_dies_takes_the_service_down_with_exit_1(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gw = make_gateway("sqlite", tmp_path_factory)
    try:
        gw.start(workers=2)
        assert gw.proc is not None
        first, second = worker_pids(gw)
        subprocess.run(["kill", "-KILL", str(first)], check=True)
        assert gw.proc.popen.wait(30) == 1
        assert gone(second)
        assert f"worker {first} stopped on its own" in gw.log_text()
    finally:
        gw.stop()
