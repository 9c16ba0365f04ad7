"""/healthz, /readyz and /metrics on a gateway process, and billing traces switched at run time.

PostgreSQL is reached through a proxy the test can cut, so the database goes away for this
gateway only; the machine's server keeps serving every other test.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    Gateway,
    Sandbox,
    _drop_pg_database,
    free_port,
    make_gateway,
)
from tests.conftest import add_sandbox_account as add_account
from tests.tcp_proxy import TcpProxy

ADMIN_TOKEN = "metrics-admin-token-0123456789"
PG_PORT = 5432
REDIS_PORT = 6379


def add_sandbox_account(gw: Gateway, sandbox: Sandbox) -> None:
    add_account(gw, sandbox, "sk-upstream-secret-0002")


def running_proxy(port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def proxy() -> Iterator[TcpProxy]:
    yield from running_proxy(PG_PORT)


@pytest.fixture(scope="module")
def redis_proxy() -> Iterator[TcpProxy]:
    yield from running_proxy(REDIS_PORT)


@pytest.fixture(scope="module")
def ops_gateway(
    sandbox: Sandbox,
    proxy: TcpProxy,
    redis_proxy: TcpProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """A gateway on PostgreSQL and Redis through proxies, with an admin token."""
    gw = make_gateway("postgresql", tmp_path_factory)
    name = gw.database_url.rsplit("/", 1)[1]
    gw.database_url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
    gw.env.update(
        {
            "CODEX_GATEWAY_DATABASE_URL": gw.database_url,
            "CODEX_GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "CODEX_GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "CODEX_GATEWAY_BUILD_COMMIT": "feedc0ffee12",
        }
    )
    try:
        add_sandbox_account(gw, sandbox)
        gw.start(log_level="INFO")
        yield gw
    finally:
        gw.stop()
        _drop_pg_database(name)


def wait_status(url: str, status: int, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, timeout=10)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def metrics(gw: Gateway) -> str:
    response = httpx.get(
        gw.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; 0 when the series does not exist yet."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and ",".join(sorted((match[2] or "").split(","))) == wanted:
            return float(match[3])
    return 0.0


def stream(gw: Gateway, key: str, **headers: str) -> httpx.Response:
    response = httpx.post(
        gw.url + "/v1/responses",
        headers={"Authorization": f"Bearer {key}", **headers},
        json={"model": "gpt-5.1-codex", "input": "hi", "stream": True},
        timeout=30,
    )
    assert response.status_code == 200
    return response


def test_healthz_shows_the_version_and_the_commit(ops_gateway: Gateway) -> None:
    response = httpx.get(ops_gateway.url + "/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": "0.1.0", "commit": "feedc0ffee12"}


def test_readyz_goes_unready_without_the_database_and_ready_when_it_returns(
    ops_gateway: Gateway, proxy: TcpProxy
) -> None:
    ready = httpx.get(ops_gateway.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["problems"] == {}

    proxy.cut()
    try:
        down = wait_status(ops_gateway.url + "/readyz", 503)
        alive = httpx.get(ops_gateway.url + "/healthz")
    finally:
        proxy.restore()
    back = wait_status(ops_gateway.url + "/readyz", 200)

    assert down.status_code == 503
    assert down.json()["status"] == "not ready"
    assert list(down.json()["problems"]) == ["database"]
    assert alive.status_code == 200
    assert back.status_code == 200, back.text


def test_readyz_goes_unready_without_redis_and_ready_when_it_returns(
    ops_gateway: Gateway, redis_proxy: TcpProxy
) -> None:
    redis_proxy.cut()
    try:
        down = wait_status(ops_gateway.url + "/readyz", 503)
    finally:
        redis_proxy.restore()
    back = wait_status(ops_gateway.url + "/readyz", 200)

    assert down.status_code == 503
    assert list(down.json()["problems"]) == ["redis"]
    assert back.status_code == 200, back.text


def test_metrics_needs_the_admin_token(ops_gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        response = httpx.get(ops_gateway.url + "/metrics", headers=headers)

        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert ADMIN_TOKEN not in response.text


def test_metrics_counters_move_after_requests(ops_gateway: Gateway) -> None:
    _, key = ops_gateway.new_user("10")
    before = metrics(ops_gateway)

    request_ids = [
        stream(ops_gateway, key, **{"x-sandbox-transcript": "responses-cached"}).headers[
            "x-request-id"
        ]
        for _ in range(2)
    ]
    for request_id in request_ids:
        ops_gateway.usage_row(request_id)
    after = metrics(ops_gateway)  # recorded when the row is queued, before it is written

    route = {"route": "/v1/responses", "status": "200", "model": "gpt-5.1-codex"}
    model = {"model": "gpt-5.1-codex"}

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("codex_gateway_requests_total", **route) == 2
    assert moved("codex_gateway_request_seconds_count", route="/v1/responses") == 2
    assert moved("codex_gateway_upstream_first_byte_seconds_count", **model) == 2
    assert moved("codex_gateway_overhead_seconds_count") == 2
    assert moved("codex_gateway_tokens_total", **model, token_class="cached_input") == 2 * 11465
    assert moved("codex_gateway_tokens_total", **model, token_class="output") == 2 * 306
    assert moved("codex_gateway_cost_usd_total", **model) == pytest.approx(2 * 0.004875625)
    assert moved("codex_gateway_spooled_rows_total") == 0
    assert sample(after, "codex_gateway_streams_in_flight") == 0
    assert sample(after, "codex_gateway_open_holds") == 0


def test_request_series_are_labelled_by_the_priced_model_not_the_name_sent(
    ops_gateway: Gateway,
) -> None:
    """A dated snapshot counts under the model it is priced as, and a name with no price
    under `unknown`, so a client cannot add series by inventing names."""
    _, key = ops_gateway.new_user("10")
    before = metrics(ops_gateway)

    for model in ("gpt-5.1-codex-2025-11-13", "gpt-5.1-codex-2031-05-05", "no-such-model"):
        httpx.post(
            ops_gateway.url + "/v1/responses",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": model, "input": "hi"},
            timeout=30,
        )
    after = metrics(ops_gateway)

    route = {"route": "/v1/responses", "status": "200", "model": "gpt-5.1-codex"}
    unknown = {"route": "/v1/responses", "status": "404", "model": "unknown"}
    assert (
        sample(after, "codex_gateway_requests_total", **route)
        - sample(before, "codex_gateway_requests_total", **route)
        == 2
    )
    assert (
        sample(after, "codex_gateway_requests_total", **unknown)
        - sample(before, "codex_gateway_requests_total", **unknown)
        == 1
    )
    assert "2025-11-13" not in after and "2031-05-05" not in after


def test_an_upstream_failure_counts_by_account_and_kind(
    ops_gateway: Gateway, sandbox: Sandbox
) -> None:
    _, key = ops_gateway.new_user("10")
    before = metrics(ops_gateway)

    response = httpx.post(
        ops_gateway.url + "/v1/responses",
        headers={
            "Authorization": f"Bearer {key}",
            "x-sandbox-transcript": "chatgpt-usage-limit-429",
        },
        json={"model": "gpt-5.1-codex", "input": "hi"},
        timeout=30,
    )
    ops_gateway.usage_row(response.headers["x-request-id"])
    after = metrics(ops_gateway)

    labels = {"account": "sandbox", "kind": "http_429"}
    quota = "codex_gateway_account_quota_used_percent"
    window = "codex_gateway_account_quota_window_minutes"
    # the only account is behind the wall it announced: the client gets that wall's 429
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "usage_limit_reached"
    assert sample(after, quota, account="sandbox", window="primary") == 100.0
    assert sample(after, quota, account="sandbox", window="secondary") == 61.5
    assert sample(after, window, account="sandbox", window="secondary") == 10080
    assert (
        sample(after, "codex_gateway_upstream_errors_total", **labels)
        - sample(before, "codex_gateway_upstream_errors_total", **labels)
        == 1
    )
    # The 429 rested the only account; put it back for the tests that follow.
    ops_gateway.cli("accounts", "enable", "sandbox")
    wait_until_served(ops_gateway, key)


def wait_until_served(gw: Gateway, key: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(
            gw.url + "/v1/responses",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-5.1-codex", "input": "hi"},
            timeout=30,
        )
        if response.status_code == 200:
            return
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


def stage_lines(gw: Gateway, request_id: str) -> list[str]:
    return [
        line
        for line in gw.log_text().splitlines()
        if "codex_gateway.billing" in line and request_id in line and "stage=" in line
    ]


def test_a_billing_trace_for_one_key_starts_and_stops_without_a_restart(
    ops_gateway: Gateway,
) -> None:
    _, traced_key = ops_gateway.new_user("10")
    _, other_key = ops_gateway.new_user("10")
    key_id = str(ops_gateway.cli_json("keys", "list")[-2]["id"])
    untraced = stream(ops_gateway, traced_key).headers["x-request-id"]
    ops_gateway.usage_row(untraced)

    ops_gateway.cli("trace", "on", key_id)
    listed = ops_gateway.cli_json("trace", "list")
    time.sleep(1.0)  # a few catalog polls (0.2 s each)
    traced = stream(ops_gateway, traced_key).headers["x-request-id"]
    other = stream(ops_gateway, other_key).headers["x-request-id"]
    for request_id in (traced, other):
        ops_gateway.usage_row(request_id)
    ops_gateway.cli("trace", "off", key_id)
    time.sleep(1.0)
    after_off = stream(ops_gateway, traced_key).headers["x-request-id"]
    ops_gateway.usage_row(after_off)
    time.sleep(0.3)

    assert [row["id"] for row in listed] == [int(key_id)]
    assert traced_key not in str(listed)
    lines = stage_lines(ops_gateway, traced)
    assert [line.split("stage=")[1].split()[0] for line in lines] == [
        "raw",
        "mapped",
        "billed",
        "cost",
    ]
    assert all(" INFO " in line for line in lines)
    assert stage_lines(ops_gateway, untraced) == []
    assert stage_lines(ops_gateway, other) == []
    assert stage_lines(ops_gateway, after_off) == []
    assert traced_key not in ops_gateway.log_text()


@pytest.fixture(scope="module")
def bare_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway on SQLite with no upstream account and an unreachable Redis."""
    gw = make_gateway("sqlite", tmp_path_factory)
    gw.env["CODEX_GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    try:
        gw.start(log_level="INFO")
        yield gw
    finally:
        gw.stop()


def test_readyz_names_every_missing_part(bare_gateway: Gateway) -> None:
    response = httpx.get(bare_gateway.url + "/readyz", timeout=10)

    problems: dict[str, Any] = response.json()["problems"]
    assert response.status_code == 503
    assert sorted(problems) == ["redis", "upstream"]
    assert problems["upstream"] == "no enabled upstream account"


def test_metrics_is_off_without_an_admin_token(bare_gateway: Gateway) -> None:
    response = httpx.get(bare_gateway.url + "/metrics")

    assert response.status_code == 404
    assert "CODEX_GATEWAY_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_plain_log_lines_carry_the_request_id(bare_gateway: Gateway) -> None:
    response = httpx.get(bare_gateway.url + "/healthz")
    time.sleep(0.2)

    request_id = response.headers["x-request-id"]
    assert any(
        f"[{request_id}] GET /healthz 200" in line for line in bare_gateway.log_text().splitlines()
    )
