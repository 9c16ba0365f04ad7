"""The production topology without Docker: two gateway processes on one PostgreSQL database
and Redis, both serving, both billing into the same balances exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.conftest import (
    Gateway,
    Proc,
    Sandbox,
    _drop_pg_database,
    free_port,
    make_gateway,
    spawn,
    wait_http,
)
from tests.http.test_operations import add_sandbox_account
from tests.http.test_responses import expected_cost

REQUESTS_PER_PROCESS = 6
CACHED_COUNTS = (11771, 11465, 306, 192)  # responses-cached: input, cached, output, reasoning


@pytest.fixture(scope="module")
def two_processes(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    """The gateway fixture's process plus a second one on the same database and Redis."""
    gw = make_gateway("postgresql", tmp_path_factory)
    gw.env["CODEX_GATEWAY_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    try:
        add_sandbox_account(gw, sandbox)
        gw.start(log_level="INFO")
        port = free_port()
        env = gw.env | {"CODEX_GATEWAY_SPOOL_PATH": str(gw.workdir / "second-spool.jsonl")}
        log = gw.workdir / "second.log"
        second: Proc = spawn(["serve", "--port", str(port)], env, log)
        gw.extra_procs.append(second)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        yield gw, url
    finally:
        gw.stop()
        _drop_pg_database(gw.database_url.rsplit("/", 1)[1])


def wait_for_rows(gw: Gateway, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Usage rows by request id, once all of `request_ids` are written (after the last byte)."""
    deadline = time.monotonic() + 15
    while True:
        rows = {row["request_id"]: row for row in gw.usage_rows()}
        if set(request_ids) <= rows.keys() or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_both_processes_are_ready(two_processes: tuple[Gateway, str]) -> None:
    gw, second = two_processes

    for url in (gw.url, second):
        response = httpx.get(url + "/readyz", timeout=10)
        assert response.status_code == 200, response.text


def test_both_processes_bill_one_balance_exactly_under_concurrency(
    two_processes: tuple[Gateway, str],
) -> None:
    gw, second = two_processes
    user, key = gw.new_user("10")
    request_ids: dict[str, list[str]] = {gw.url: [], second: []}
    errors: list[BaseException] = []

    def send(url: str, stream: bool) -> None:
        try:
            response = httpx.post(
                url + "/v1/responses",
                headers={
                    "Authorization": f"Bearer {key}",
                    "x-sandbox-transcript": "responses-cached",
                },
                json={"model": "gpt-5.1-codex", "input": "hi", "stream": stream},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            request_ids[url].append(response.headers["x-request-id"])
        except BaseException as exc:  # collected and re-raised on the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=send, args=(url, n % 2 == 0))
        for n in range(REQUESTS_PER_PROCESS)
        for url in (gw.url, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    rows = wait_for_rows(gw, request_ids[gw.url] + request_ids[second])

    assert errors == []
    assert [len(ids) for ids in request_ids.values()] == [REQUESTS_PER_PROCESS] * 2
    total = 2 * REQUESTS_PER_PROCESS
    assert Decimal(gw.balance(user)) == Decimal(10) - total * expected_cost(CACHED_COUNTS)
    charges = [entry for entry in gw.cli_json("users", "ledger", user) if entry["kind"] == "settle"]
    assert len(charges) == total
    assert set(request_ids[gw.url] + request_ids[second]) <= rows.keys()
