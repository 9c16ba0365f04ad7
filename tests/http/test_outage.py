"""The database goes away in the middle of a run and comes back: no bill is lost.

The served process reaches PostgreSQL through a proxy that the test cuts (dropping the open
connections and refusing new ones) and restores. Requests that finish during the outage are
spooled and replayed by the running process; a request whose hold cannot be placed is
refused with a 503 that says why.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx

from tests.conftest import Gateway
from tests.http.conftest import proxied, rows_by_id, serve
from tests.http.test_crash import stream
from tests.http.test_overdraft import BODY, COST
from tests.tcp_proxy import TcpProxy

__all__ = ["proxied"]


def test_an_outage_loses_no_usage_and_refuses_holds_it_cannot_place(
    proxied: tuple[Gateway, TcpProxy],
) -> None:
    gateway, proxy = proxied
    serve(gateway, proxy, "outage.log")
    user, key = gateway.new_user("20")
    # A second user whose key the process knows but who holds no lease yet.
    _, stranger_key = gateway.new_user("20")
    time.sleep(0.5)  # one catalog refresh
    ids: list[str] = []
    refused: list[httpx.Response] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(stream(client, gateway.url, key, 0, ids) for _ in range(3)))
            during = [
                asyncio.create_task(stream(client, gateway.url, key, 200, ids)) for _ in range(5)
            ]
            while len(ids) < 8:
                await asyncio.sleep(0.05)
            proxy.cut()
            # a hold that needs the database: refused, with a reason
            refused.append(
                await client.post(
                    gateway.url + "/v1/responses",
                    content=BODY,
                    headers={"Authorization": f"Bearer {stranger_key}"},
                )
            )
            # one the process's lease still covers: served, its bill spooled
            await stream(client, gateway.url, key, 0, ids)
            await asyncio.gather(*during)
            await asyncio.sleep(5)  # the writer gives up and spools
            assert gateway.workdir.joinpath("unsettled-usage.jsonl").exists()
            proxy.restore()

    asyncio.run(run())
    (response,) = refused
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert "cannot reach its database" in error["message"]

    deadline = time.monotonic() + 20
    while len(rows := rows_by_id(gateway, user)) < len(ids):
        assert time.monotonic() < deadline, f"{len(rows)} of {len(ids)} rows"
        time.sleep(0.2)
    assert set(rows) == set(ids) and len(ids) == 9
    assert all(Decimal(row["cost_usd"]) == COST for row in rows.values())
    assert Decimal(gateway.balance(user)) == 20 - 9 * COST
    assert not gateway.workdir.joinpath("unsettled-usage.jsonl").exists()
    assert "ok:" in gateway.cli("ledger", "verify").stdout
