"""Key limits: a USD cap held across two processes, an expiry date, a model allowlist."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx

from tests.conftest import Gateway, Sandbox
from tests.http.test_overdraft import BODY, COST, LARGEST, most_at_once, stream

CAP_REQUESTS = 4


def new_key(gateway: Gateway, user: str, *limits: str) -> str:
    created = gateway.cli("keys", "create", "--user", user, *limits).stdout
    return created.strip().splitlines()[-1]


def limited_key(gateway: Gateway, *limits: str) -> str:
    """A key with `limits` for a fresh user with $10, once the processes know it."""
    user, _ = gateway.new_user("10")
    key = new_key(gateway, user, *limits)
    time.sleep(0.5)
    return key


def refusal(gateway: Gateway, key: str) -> tuple[int, dict[str, str]]:
    """A non-streaming request's status and error."""
    response = httpx.post(
        gateway.url + "/v1/responses", content=BODY, headers={"Authorization": f"Bearer {key}"}
    )
    return response.status_code, response.json()["error"]


def key_row(gateway: Gateway, key: str) -> dict[str, object]:
    return next(k for k in gateway.cli_json("keys", "list") if str(k["display"])[-4:] == key[-4:])


def test_a_key_cap_holds_across_two_processes(two_gateways: tuple[Gateway, str]) -> None:
    gateway, second_url = two_gateways
    user, _ = gateway.new_user("1000")
    cap = CAP_REQUESTS * LARGEST
    key = new_key(gateway, user, "--cap", str(cap))
    time.sleep(0.5)  # both processes' catalogs know the key

    async def fire() -> list[tuple[int, float, float]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
            urls = (gateway.url, second_url)
            return await asyncio.gather(*(stream(c, urls[i % 2], key) for i in range(60)))

    results = asyncio.run(fire())
    admitted = [(start, end) for status, start, end in results if status == 200]
    assert {status for status, _, _ in results} == {200, 429}
    # spent + held never passed the cap: at most CAP_REQUESTS largest holds at once
    assert 1 <= most_at_once(admitted) <= CAP_REQUESTS

    deadline = time.monotonic() + 20
    while Decimal(str(key_row(gateway, key)["spent"])) < len(admitted) * COST:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    row = key_row(gateway, key)
    assert Decimal(str(row["spent"])) == len(admitted) * COST
    assert Decimal(str(row["spent"])) + Decimal(str(row["held"])) <= cap
    assert Decimal(gateway.balance(user)) == 1000 - len(admitted) * COST
    assert "ok:" in gateway.cli("ledger", "verify").stdout


def test_a_refused_request_names_the_cap(two_gateways: tuple[Gateway, str]) -> None:
    gateway, _ = two_gateways
    key = limited_key(gateway, "--cap", "0.01")

    status, error = refusal(gateway, key)

    assert status == 429
    assert (error["code"], error["type"]) == ("key_cap_reached", "insufficient_quota")
    assert "spending cap of $0.01" in error["message"]


def test_an_expired_key_is_refused_until_its_expiry_moves(
    two_gateways: tuple[Gateway, str],
) -> None:
    gateway, _ = two_gateways
    key = limited_key(gateway, "--expires", "2020-01-31")
    status, error = refusal(gateway, key)

    assert status == 401
    assert error["code"] == "api_key_expired"
    assert "expired at 2020-01-31 00:00 UTC" in error["message"]
    gateway.cli("keys", "update", str(key_row(gateway, key)["id"]), "--expires", "never")
    time.sleep(0.5)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", gateway.url + "/v1/responses", content=BODY, headers=headers) as ok:
        assert ok.status_code == 200


def test_a_model_outside_the_allowlist_is_refused_before_any_upstream_call(
    two_gateways: tuple[Gateway, str], sandbox: Sandbox
) -> None:
    gateway, _ = two_gateways
    key = limited_key(gateway, "--models", "gpt-5.1-codex-mini,gpt-5-codex")
    sandbox.clear()

    status, error = refusal(gateway, key)

    assert status == 403
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert "`gpt-5.1-codex`" in error["message"]
    assert "`gpt-5-codex`, `gpt-5.1-codex-mini`" in error["message"]
    assert sandbox.requests() == []
    listed = key_row(gateway, key)
    assert listed["models"] == '["gpt-5.1-codex-mini","gpt-5-codex"]'


def test_a_dated_snapshot_of_an_allowed_model_is_allowed(
    two_gateways: tuple[Gateway, str],
) -> None:
    """Priced as the model it is a snapshot of, so allowed as that model; another model's
    snapshot is not."""
    gateway, _ = two_gateways
    key = limited_key(gateway, "--models", "gpt-5.1-codex")
    headers = {"Authorization": f"Bearer {key}"}

    answers = {
        model: httpx.post(
            gateway.url + "/v1/responses",
            json={"model": model, "input": "hi"},
            headers=headers,
            timeout=30,
        ).status_code
        for model in ("gpt-5.1-codex-2025-11-13", "gpt-5.1-codex-mini-2025-11-13")
    }

    assert answers == {"gpt-5.1-codex-2025-11-13": 200, "gpt-5.1-codex-mini-2025-11-13": 403}


def settled_pair(gateway: Gateway, second_url: str, key: str) -> None:
    """Two requests through each process, so that both hold leases for the key's owner."""
    headers = {"Authorization": f"Bearer {key}"}
    for url in (gateway.url, second_url, gateway.url, second_url):
        response = httpx.post(url + "/v1/responses", content=BODY, headers=headers)
        assert response.status_code == 200


def refusals(gateway: Gateway, second_url: str, key: str) -> list[tuple[int, str]]:
    headers = {"Authorization": f"Bearer {key}"}
    answers = []
    for url in (gateway.url, second_url):
        response = httpx.post(url + "/v1/responses", content=BODY, headers=headers)
        answers.append((response.status_code, response.json().get("error", {}).get("code")))
    return answers


def test_lowering_a_cap_stops_the_key_in_both_processes_within_a_poll(
    two_gateways: tuple[Gateway, str],
) -> None:
    gateway, second_url = two_gateways
    user, _ = gateway.new_user("1000")
    key = new_key(gateway, user, "--cap", str(100 * LARGEST))
    time.sleep(0.5)
    settled_pair(gateway, second_url, key)
    deadline = time.monotonic() + 20
    while Decimal(str(key_row(gateway, key)["spent"])) < 4 * COST:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    gateway.cli("keys", "update", str(key_row(gateway, key)["id"]), "--cap", str(4 * COST))
    time.sleep(0.6)  # three catalog polls

    assert refusals(gateway, second_url, key) == [(429, "key_cap_reached")] * 2
    row = key_row(gateway, key)
    assert (Decimal(str(row["spent"])), Decimal(str(row["held"]))) == (4 * COST, 0)
    assert "ok:" in gateway.cli("ledger", "verify").stdout


def test_a_negative_adjustment_stops_spending_from_granted_leases(
    two_gateways: tuple[Gateway, str],
) -> None:
    gateway, second_url = two_gateways
    user, key = gateway.new_user(str(100 * LARGEST))
    time.sleep(0.5)
    settled_pair(gateway, second_url, key)
    deadline = time.monotonic() + 20
    while len(gateway.cli_json("usage", "list", "--user", user)) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    take = Decimal(gateway.balance(user)) - Decimal("0.01")

    adjusted = gateway.cli(
        "users", "adjust", user, f"-{take}", "--reason", "chargeback", "--operator", "me"
    )
    time.sleep(0.6)  # three catalog polls

    assert "open leases are being returned" in adjusted.stderr
    assert refusals(gateway, second_url, key) == [(429, "insufficient_quota")] * 2
    assert Decimal(gateway.balance(user)) == Decimal("0.01")
    users = gateway.cli_json("users", "list")
    assert next(Decimal(str(u["reserved"])) for u in users if u["name"] == user) == 0
    assert "ok:" in gateway.cli("ledger", "verify").stdout
