"""The real Codex CLI through the gateway to a ChatGPT account on the mock Codex backend.

The account's base URL names the mock's `tool-conversation` scenario: turn 1 answers with an
`exec_command` call, turn 2 (the history plus the call's output) with text. Every request
the mock accepted must break none of its rules, carry the account's token and a derived
session, and each turn must be billed exactly. Two more runs cover the other paths Codex
0.169.0 calls on the gateway: its model catalog (when it authenticates with a command) and
remote compaction (for a provider named "OpenAI"), which is an ordinary /v1/responses call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codex_gateway.sandbox.chatgpt import violation
from tests.conftest import Gateway, Sandbox
from tests.test_codex_cli import (
    COMMAND_AUTH,
    WORK_FILE,
    CodexRun,
    assert_each_turn_billed,
    assert_tool_history,
    codex_bin,
    codex_home,
    final_text,
    run_codex,
    user_usage_rows,
)
from tests.upstream.chatgpt_helpers import (
    ChatGPTAccount,
    backend_requests,
    chatgpt_gateway_on_each_backend,
    only_chatgpt_accounts,
)

# fixtures, used by name
__all__ = ["chatgpt_gateway_on_each_backend", "codex_bin", "codex_home"]

# responses-compaction.sse: Codex's remote compaction, answered with one compaction item.
COMPACTION_COST = (Decimal(5420 - 4864) * Decimal("1.25") + 4864 * Decimal("0.125")) / 10**6 + (
    212 * Decimal(10)
) / 10**6


@pytest.fixture
def account(gateway: Gateway, sandbox: Sandbox) -> ChatGPTAccount:
    (only,) = only_chatgpt_accounts(gateway, sandbox, [{"transcript": "tool-conversation"}])
    return only


@pytest.fixture
def codex(
    gateway: Gateway, codex_bin: Path, codex_home: Path, tmp_path: Path
) -> Callable[..., CodexRun]:
    """Run `codex exec` against the gateway in a work folder with one file; `codex(key,
    **options)`, the options as `codex_args` takes them."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / WORK_FILE).write_text("hello\n", encoding="utf-8")

    def run(key: str, **options: Any) -> CodexRun:
        return run_codex(codex_bin, gateway.url + "/v1", key, codex_home, workdir, **options)

    return run


def assert_valid_backend_request(request: dict[str, Any], account: ChatGPTAccount) -> None:
    headers = request["headers"]
    assert violation(headers, json.loads(request["body"])) is None
    assert headers["authorization"] == f"Bearer {account.access_token}"
    assert headers["chatgpt-account-id"] == account.account_id
    assert headers["originator"] == "codex_exec"


def test_codex_exec_tool_conversation_through_a_chatgpt_account_is_billed_per_turn(
    gateway: Gateway, sandbox: Sandbox, account: ChatGPTAccount, codex: Callable[..., CodexRun]
) -> None:
    name, key = gateway.new_user("5")
    balance_before = Decimal(gateway.balance(name))
    sandbox.clear()

    run = codex(key)

    assert run.returncode == 0, f"codex exec exited {run.returncode}:\n{run.stderr}"
    assert final_text("responses-text.sse") in run.stdout
    seen = backend_requests(sandbox)
    assert len(seen) == 2, [request["path"] for request in sandbox.requests()]
    for request in seen:
        assert_valid_backend_request(request, account)
        assert key not in json.dumps(request)
    first, second = [json.loads(request["body"]) for request in seen]
    assert first["instructions"].startswith("You are a coding agent running in the Codex CLI")
    assert seen[0]["headers"]["session_id"] == seen[1]["headers"]["session_id"]
    assert second["prompt_cache_key"] == seen[0]["headers"]["session_id"]
    assert_tool_history(first, second)
    rows = assert_each_turn_billed(gateway, name, balance_before)
    assert {row["account"] for row in rows} == {account.name}
    log = gateway.log_text()
    assert key not in log and account.access_token not in log


def test_codex_reads_the_model_catalog_the_gateway_answers(
    gateway: Gateway, account: ChatGPTAccount, codex: Callable[..., CodexRun]
) -> None:
    _, key = gateway.new_user("5")
    asked = gateway.log_text().count("GET /v1/models 200")

    run = codex(key, auth=COMMAND_AUTH)

    assert run.returncode == 0, run.stderr
    assert gateway.log_text().count("GET /v1/models 200") > asked
    assert "failed to refresh available models" not in run.stderr
    assert "failed to decode models response" not in run.stderr


def test_codex_remote_compaction_is_relayed_and_billed(
    gateway: Gateway, sandbox: Sandbox, account: ChatGPTAccount, codex: Callable[..., CodexRun]
) -> None:
    name, key = gateway.new_user("5")
    sandbox.clear()

    run = codex(key, provider_name="OpenAI", extra=("model_auto_compact_token_limit=1000",))

    assert run.returncode == 0, run.stderr
    assert "Error running remote compact task" not in run.stderr
    seen = backend_requests(sandbox)
    assert [json.loads(r["body"])["input"][-1]["type"] for r in seen] == [
        "message",
        "compaction_trigger",
        "compaction",
    ]
    for request in seen:
        assert_valid_backend_request(request, account)
    rows = user_usage_rows(gateway, name, 3)
    compaction = next(row for row in rows if row["response_id"] == "resp_fx_compaction")
    assert compaction["status"] == "completed"
    assert Decimal(compaction["cost_usd"]) == COMPACTION_COST


def test_codex_shows_the_usage_limit_and_stops_when_every_account_is_walled(
    gateway: Gateway, sandbox: Sandbox, codex: Callable[..., CodexRun]
) -> None:
    only_chatgpt_accounts(gateway, sandbox, [{"transcript": "chatgpt-usage-limit-429"}])
    name, key = gateway.new_user("5")
    sandbox.clear()

    run = codex(key)

    assert run.returncode != 0
    assert "usage limit" in run.stderr.lower(), run.stderr
    # a 429 Codex recognises is shown, not retried: one request reached the gateway
    rows = user_usage_rows(gateway, name, 1)
    assert [(row["http_status"], row["status"]) for row in rows] == [(429, "upstream_error")]
    assert len(backend_requests(sandbox)) == 1
    assert Decimal(gateway.balance(name)) == 5
