"""kill -9 of a gateway process in the middle of 20 streams leaves no hold open.

The gateway reaches PostgreSQL through a proxy the test cuts before the kill, so streams that
end in the meantime have their usage only in the process's hold journal: they must be settled
from it after the restart. Streams still running at the kill must be released and flagged;
streams settled before must not be charged again.
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal

import httpx
import pytest

from tests.conftest import Gateway, Sandbox, add_sandbox_account, make_gateway
from tests.http.conftest import rows_by_id, serve
from tests.http.test_overdraft import BODY, COST
from tests.tcp_proxy import TcpProxy


async def stream(
    client: httpx.AsyncClient, url: str, key: str, delay_ms: int, ids: list[str]
) -> None:
    """One paced stream; its request id goes to `ids` as soon as its headers arrive."""
    headers = {"Authorization": f"Bearer {key}", "x-sandbox-delay-ms": str(delay_ms)}
    try:
        async with client.stream(
            "POST", url + "/v1/responses", content=BODY, headers=headers
        ) as response:
            assert response.status_code == 200
            ids.append(response.headers["x-request-id"])
            async for _ in response.aiter_raw():
                pass
    except httpx.HTTPError:
        pass  # the process was killed under it


def test_kill_9_mid_stream_settles_or_releases_every_request(
    proxied: tuple[Gateway, TcpProxy],
) -> None:
    gateway, proxy = proxied
    killed = serve(gateway, proxy, "killed.log")
    user, key = gateway.new_user("50")
    settled_before: list[str] = []
    journaled: list[str] = []
    running: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
            # 4 streams that end and are settled while the database is there
            await asyncio.gather(
                *(stream(client, gateway.url, key, 0, settled_before) for _ in range(4))
            )
            while len(await asyncio.to_thread(rows_by_id, gateway, user)) < 4:
                await asyncio.sleep(0.1)
            # 8 streams that end after the database is cut, 8 still running at the kill
            ending = [
                asyncio.create_task(stream(client, gateway.url, key, 150, journaled))
                for _ in range(8)
            ]
            slow = [
                asyncio.create_task(stream(client, gateway.url, key, 1000, running))
                for _ in range(8)
            ]
            while len(journaled) + len(running) < 16:
                await asyncio.sleep(0.05)
            proxy.cut()
            await asyncio.gather(*ending)
            await asyncio.sleep(0.5)  # the writer is retrying; nothing reached the database
            assert not set(journaled) & set(await asyncio.to_thread(rows_by_id, gateway, user))
            os.kill(killed.popen.pid, 9)
            killed.popen.wait(10)
            await asyncio.gather(*slow)

    asyncio.run(run())
    assert len(journaled) == len(running) == 8
    assert any(gateway.workdir.joinpath("hold-journal").iterdir())

    serve(gateway, None, "restarted.log")

    rows = rows_by_id(gateway, user)
    assert set(rows) == {*settled_before, *journaled, *running}
    for request_id in [*settled_before, *journaled]:
        assert (rows[request_id]["status"], Decimal(rows[request_id]["cost_usd"])) == (
            "completed",
            COST,
        )
    for request_id in running:
        row = rows[request_id]
        assert (row["status"], Decimal(row["cost_usd"]), row["flags"]) == (
            "interrupted",
            0,
            ["interrupted"],
        )
    (listed,) = [u for u in gateway.cli_json("users", "list") if u["name"] == user]
    assert Decimal(listed["reserved"]) == 0
    assert Decimal(listed["balance"]) == 50 - 12 * COST
    ledger = gateway.cli_json("users", "ledger", user)
    settles = {entry["request_id"] for entry in ledger if entry["kind"] == "settle"}
    releases = {entry["request_id"] for entry in ledger if entry["kind"] == "release"}
    assert settles == {*settled_before, *journaled}
    assert releases - {None} == set(running)
    # the lease of the killed process went back as a release of the lease, not of a request
    assert None in releases
    assert "ok:" in gateway.cli("ledger", "verify").stdout
    assert list(gateway.workdir.joinpath("hold-journal").iterdir()) != []  # the new process's own


def test_a_killed_gateway_journal_is_never_settled_into_another_database(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two gateways of different databases share one journal folder, as two started in one
    working directory with only the database changed do: the survivor of a kill -9 leaves the
    other's journal alone, and the killed one's next start settles it into its own database."""
    ours = make_gateway("sqlite", tmp_path_factory)
    theirs = make_gateway("sqlite", tmp_path_factory)
    folder = ours.workdir / "hold-journal"
    for gateway in (ours, theirs):
        gateway.env["CODEX_GATEWAY_JOURNAL_DIR"] = str(folder)
        add_sandbox_account(gateway, sandbox)
    ours_user, _ = ours.new_user("50")
    theirs_user, theirs_key = theirs.new_user("50")
    survivor = serve(ours, None, "ours.log")
    killed = serve(theirs, None, "theirs.log")
    running: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            slow = [
                asyncio.create_task(stream(client, theirs.url, theirs_key, 1000, running))
                for _ in range(4)
            ]
            while len(running) < 4:
                await asyncio.sleep(0.05)
            os.kill(killed.popen.pid, 9)
            killed.popen.wait(10)
            await asyncio.gather(*slow)

    try:
        asyncio.run(run())
        deadline = time.monotonic() + 20  # the survivor sweeps every 0.5 s here
        while "of another database" not in survivor.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert rows_by_id(ours, ours_user) == {}
        assert ours.cli_json("usage", "list") == []

        serve(theirs, None, "theirs-again.log")
        rows = rows_by_id(theirs, theirs_user)
        assert set(rows) == set(running)
        assert {row["status"] for row in rows.values()} == {"interrupted"}
    finally:
        survivor.stop()
        theirs.stop()
