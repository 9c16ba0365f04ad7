"""A serving gateway with upstream API keys sealed at rest, on both backends: sealed keys
and keys still in clear both reach the upstream as they were given; an account whose key
does not open is named in the log and left out while the others serve; the start says which
keys are stored unsealed and how to seal them. No key appears in the log or a usage row."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import Gateway, Sandbox
from tests.upstream.pool_helpers import CATALOG_SETTLE_SECONDS

SECRET = "operator-secret-key-0123456789abcdef"
KEYS = {
    "changed": "sk-upstream-changed-0001",  # sealed with a secret key since changed
    "sealed": "sk-upstream-sealed-0002",
    "clear": "sk-upstream-clear-0003",  # added before the gateway had a secret key
}


@pytest.fixture
def gateway(keyless_gateway: Gateway) -> Gateway:
    return keyless_gateway


def add(
    gateway: Gateway,
    sandbox: Sandbox,
    name: str,
    priority: int,
    secret: str | None,
    *extra: str,
) -> None:
    """Add an account under the secret key `secret` (None: none at all)."""
    gateway.env.pop("CODEX_GATEWAY_SECRET_KEY", None)
    if secret is not None:
        gateway.env["CODEX_GATEWAY_SECRET_KEY"] = secret
    gateway.cli(
        "accounts", "add", "--name", name, "--base-url", sandbox.base_url,
        "--api-key", KEYS[name], "--priority", str(priority), *extra,
    )  # fmt: skip


def send(gateway: Gateway, sandbox: Sandbox, key: str) -> httpx.Response:
    """Send one request, with the sandbox's record of requests cleared first."""
    sandbox.clear()
    return httpx.post(
        gateway.url + "/v1/responses",
        json={"model": "gpt-5.1-codex", "input": "hi"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def served_with(gateway: Gateway, sandbox: Sandbox, key: str) -> str:
    """Send one request; the credential it reached the upstream with."""
    response = send(gateway, sandbox, key)
    assert response.status_code == 200, response.text
    [seen] = sandbox.requests()
    return str(seen["headers"]["authorization"])


def assert_no_key_in(text: str) -> None:
    for key in KEYS.values():
        assert key not in text


def test_sealed_and_clear_keys_serve_and_a_key_that_does_not_open_is_left_out(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    add(gateway, sandbox, "changed", 1, SECRET + "-before-the-change")
    add(gateway, sandbox, "sealed", 2, SECRET, "--secret-key-changed")
    add(gateway, sandbox, "clear", 3, None)
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.start()
    _, key = gateway.new_user()

    first = served_with(gateway, sandbox, key)
    gateway.cli("accounts", "disable", "sealed")
    time.sleep(CATALOG_SETTLE_SECONDS)
    second = served_with(gateway, sandbox, key)

    assert (first, second) == (f"Bearer {KEYS['sealed']}", f"Bearer {KEYS['clear']}")
    log = gateway.log_text()
    assert (
        "the API key of upstream account changed does not open with this gateway's secret key"
        in log
    )
    assert log.count("account changed does not open") == 1  # not again at each reload
    assert (
        "the API keys of upstream accounts clear are stored unsealed in the database; run "
        "`codex-gateway accounts seal` with this gateway's secret key to seal them" in log
    )
    assert "Traceback" not in log
    assert_no_key_in(log + gateway.cli("usage", "list", "--json").stdout)


def test_without_a_secret_key_keys_in_clear_serve_and_the_start_says_how_to_seal_them(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    add(gateway, sandbox, "sealed", 1, SECRET)
    add(gateway, sandbox, "clear", 2, None)
    gateway.start()
    _, key = gateway.new_user()

    served = served_with(gateway, sandbox, key)
    gateway.cli("accounts", "disable", "clear")
    time.sleep(CATALOG_SETTLE_SECONDS)
    ready = httpx.get(gateway.url + "/readyz", timeout=10)

    assert served == f"Bearer {KEYS['clear']}"
    log = gateway.log_text()
    assert (
        "the API key of upstream account sealed is sealed and this gateway has no secret key" in log
    )
    assert (
        "the API keys of upstream accounts clear are stored unsealed in the database; first "
        "give the gateway a secret key (set CODEX_GATEWAY_SECRET_KEY (at least 32 characters) "
        "or CODEX_GATEWAY_SECRET_KEY_FILE) and restart it, then run `codex-gateway accounts "
        "seal` with that same key" in log
    )
    assert ready.status_code == 503
    assert ready.json()["problems"]["upstream"] == (
        "the sealed API keys of upstream accounts sealed do not open here (the log says why), "
        "and no other account can serve"
    )
    assert_no_key_in(log + gateway.cli("usage", "list", "--json").stdout)


def test_keys_sealed_under_a_secret_key_the_gateway_lacks_leave_no_account_out(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    """The operator seals from a shell with a secret key while the serving gateway has none:
    it reloads, cannot open the keys, and goes on with the keys it held."""
    add(gateway, sandbox, "clear", 1, None)
    gateway.start()
    _, key = gateway.new_user()
    before = served_with(gateway, sandbox, key)

    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    sealed = gateway.cli("accounts", "seal").stdout
    time.sleep(CATALOG_SETTLE_SECONDS)
    after = served_with(gateway, sandbox, key)
    ready = httpx.get(gateway.url + "/readyz", timeout=10)

    assert sealed == "sealed the API keys of 1 account(s): clear\n"
    assert before == after == f"Bearer {KEYS['clear']}"
    assert ready.status_code == 200
    log = gateway.log_text()
    assert log.count("the API key of upstream account clear is sealed and this gateway") == 1
    assert (
        "the account keeps serving with the key this process held before, until it restarts" in log
    )
    assert_no_key_in(log)


def test_a_request_no_account_can_serve_is_told_the_keys_do_not_open(
    gateway: Gateway, sandbox: Sandbox
) -> None:
    add(gateway, sandbox, "changed", 1, SECRET + "-before-the-change")
    gateway.env["CODEX_GATEWAY_SECRET_KEY"] = SECRET
    gateway.start()
    _, key = gateway.new_user()

    response = send(gateway, sandbox, key)

    assert response.status_code == 503
    assert response.json()["error"]["message"] == (
        "No upstream account is available to serve this request: 1 account(s) are left out "
        "because their API keys do not open with this gateway's secret key."
    )
    assert sandbox.requests() == []
    assert_no_key_in(response.text)
