"""New requests wait for a usage writer that is far behind, and lose nothing by it."""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal

import httpx
import pytest

from tests.conftest import Sandbox, add_sandbox_account, make_gateway

ADMIN_TOKEN = "backlog-admin-token-0123456789"
BODY = b'{"model":"gpt-5.1-codex","input":"hi"}'
COST = Decimal("0.114295")
CLIENTS = 16
EACH = 6


def test_requests_wait_for_a_writer_far_behind_and_each_is_billed_once(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    gw = make_gateway("sqlite", tmp_path_factory)
    # One bill queued is "far behind": requests that arrive while a batch is written wait.
    gw.env["CODEX_GATEWAY_WRITER_BACKLOG_ROWS"] = "1"
    gw.env["CODEX_GATEWAY_ADMIN_TOKEN"] = ADMIN_TOKEN
    add_sandbox_account(gw, sandbox)
    gw.start(log_level="INFO")
    try:
        user, key = gw.new_user("100")

        async def client_loop(client: httpx.AsyncClient) -> list[int]:
            statuses = []
            for _ in range(EACH):
                response = await client.post(
                    gw.url + "/v1/responses",
                    content=BODY,
                    headers={"Authorization": f"Bearer {key}"},
                )
                statuses.append(response.status_code)
            return statuses

        async def fire() -> list[list[int]]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client_loop(client) for _ in range(CLIENTS)))

        statuses = [status for loop in asyncio.run(fire()) for status in loop]
        assert statuses == [200] * CLIENTS * EACH

        deadline = time.monotonic() + 20
        while len(rows := gw.cli_json("usage", "list", "--user", user, "--limit", "500")) < len(
            statuses
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert len({row["request_id"] for row in rows}) == len(statuses)
        assert Decimal(gw.balance(user)) == 100 - len(statuses) * COST
        assert "ok:" in gw.cli("ledger", "verify").stdout

        waited = [row for row in rows if "waited_for_writer" in str(row["flags"])]
        assert waited
        text = httpx.get(
            gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        ).text
        counted = re.search(r"^codex_gateway_writer_waits_total (\S+)$", text, re.MULTILINE)
        assert counted is not None
        assert float(counted.group(1)) == len(waited)
    finally:
        gw.stop()
