"""`serve --workers 2`: two processes on one port, each its own gateway, billing one balance.

Connections spread across the workers (each binds the port with SO_REUSEPORT); every
request is billed exactly once, and a SIGTERM to the supervisor drains both and exits 0 (143
when a second SIGTERM cuts a drain short). What the workers share (the database, its
accounts, the journal folder) is warned about once, by the first worker.
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
import orjson
import pytest

from tests.conftest import (
    PG_ADMIN_URL,
    Gateway,
    Sandbox,
    add_sandbox_account,
    free_port,
    make_gateway,
    running_gateway,
)
from tests.http.test_responses import expected_cost
from tests.http.test_server import cut_the_drain
from tests.test_topology import CACHED_COUNTS, wait_for_rows
from tests.upstream.chatgpt_helpers import make_jwt
from tests.upstream.pool_helpers import CATALOG_SETTLE_SECONDS

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


SECRET = "operator-secret-key-0123456789abcdef"
# Each advisory about shared state, as the start (or, the last, a reload) says it.
ADVISORIES = [
    "the database was migrated by a newer version; serving it as it is",
    "left the hold journal gone-worker.lock alone: it is of another database",
    "account clear has stored quota that is not JSON",
    "the API key of upstream account sealed is sealed and this gateway has no secret key",
    "ChatGPT accounts stay out of rotation: no secret key to open their tokens",
    "the API keys of upstream accounts clear are stored unsealed in the database",
    "the API key of upstream account clear is sealed and this gateway has no secret key",
]


def shared_state_to_warn_about(gw: Gateway, sandbox: Sandbox) -> str:
    """Accounts, a journal folder and a database schema that the start warns about, for a
    gateway without a secret key; the schema's version, before it was made newer."""
    gw.cli(
        "accounts", "add", "--name", "clear", "--base-url", sandbox.base_url,
        "--api-key", "sk-upstream-clear-0003",
    )  # fmt: skip
    gw.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gw.cli(
        "accounts", "add", "--name", "sealed", "--base-url", sandbox.base_url,
        "--api-key", "sk-upstream-sealed-0002",
    )  # fmt: skip
    auth = gw.workdir / "auth.json"
    tokens = {"id_token": make_jwt(), "access_token": make_jwt(), "refresh_token": "rt_x"}
    auth.write_bytes(orjson.dumps({"OPENAI_API_KEY": None, "tokens": tokens}))
    backend = f"http://127.0.0.1:{free_port()}/backend-api"  # never called: out of rotation
    gw.cli("accounts", "import-codex", str(auth), "--name", "c1", "--base-url", backend)
    del gw.env["CODEX_GATEWAY_SECRET_KEY"]

    journals = gw.workdir / "hold-journal"
    journals.mkdir(exist_ok=True)
    (journals / "gone-worker.lock").write_text("gone-worker\nanother-database")
    with sqlite3.connect(gw.database_url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE upstream_accounts SET quota = 'x' WHERE name = 'clear'")
        [(version,)] = connection.execute("SELECT version_num FROM alembic_version")
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    return str(version)


def set_schema_version(gw: Gateway, version: str) -> None:
    with sqlite3.connect(gw.database_url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (version,))


def send_one(gw: Gateway, key: str) -> None:
    """One request on a connection of its own, which the kernel gives to either worker."""
    with httpx.Client(timeout=30) as client:
        response = client.post(
            gw.url + "/v1/responses",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-5.1-codex", "input": "hi"},
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("workers", [1, 2])
def test_warnings_about_shared_state_are_said_once_however_many_workers_serve(
    workers: int, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gw = make_gateway("sqlite", tmp_path_factory)
    for name in ("CODEX_GATEWAY_SECRET_KEY", "CODEX_GATEWAY_SECRET_KEY_FILE"):
        gw.env.pop(name, None)
    gw.env["CODEX_GATEWAY_LEASE_RENEW_SECONDS"] = "0.5"  # journal sweeps
    user, key = gw.new_user("10")
    version = shared_state_to_warn_about(gw, sandbox)
    try:
        gw.start(workers=workers)
        set_schema_version(gw, version)  # for the commands below, which migrate first
        for _ in range(REQUESTS):
            send_one(gw, key)
            serving = lease_holders(gw, user)  # a worker holds a lease once it served
            if len(serving) == workers:
                break
        # An operator seals the keys under a secret key the serving gateway lacks: each
        # worker reloads, keeps the key it held, and the first says so.
        gw.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
        gw.cli("accounts", "seal")
        time.sleep(CATALOG_SETTLE_SECONDS + 1.0)  # and a sweep of the journal folder
        send_one(gw, key)  # still served, with the key held
        log = gw.log_text()
    finally:
        gw.stop()

    assert len(serving) == workers, "not every worker served"
    assert log.count("Application startup complete") == workers  # each logs its own
    assert {advisory: log.count(advisory) for advisory in ADVISORIES} == dict.fromkeys(
        ADVISORIES, 1
    ), log
