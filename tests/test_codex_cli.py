"""The real Codex CLI, pinned in package.json, runs `codex exec` through the gateway.

Codex talks to the gateway on loopback, and the gateway relays to the sandbox's
`tool-conversation` scenario: turn 1 answers with an `exec_command` call, Codex runs it and
sends turn 2 with the call and its output, and turn 2 answers with text. Both turns must reach
the upstream as Codex sent them, with the account's key, and both must be billed.

The `-c` overrides are not optional: without them Codex 0.169.0 reaches out to analytics,
feedback, plugin and app hosts. With them it connects to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, ROOT, Gateway, Sandbox

CODEX_VERSION = "0.169.0"
CODEX_TIMEOUT = 120.0
USAGE_TIMEOUT = 15.0
UPSTREAM_KEY = "sk-upstream-secret-0001"
CALL_ID = "call_fx_1"
MODEL = "gpt-5.1-codex"
PROMPT = "List the files here"
WORK_FILE = "notes-for-codex.txt"

# Every key Codex 0.169.0 puts in a Responses body; the upstream must receive all of them.
CODEX_BODY_KEYS = frozenset(
    {
        "model",
        "input",
        "tools",
        "store",
        "stream",
        "prompt_cache_key",
        "client_metadata",
        "include",
        "reasoning",
    }
)

# gpt-5.1-codex list prices, USD per 1M tokens: input, cached input, output.
PRICE_INPUT, PRICE_CACHED, PRICE_OUTPUT = Decimal("1.25"), Decimal("0.125"), Decimal("10")


@dataclass(frozen=True)
class Turn:
    """What the sandbox's transcript for one turn reports, and so what must be billed."""

    response_id: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int

    @property
    def cost(self) -> Decimal:
        uncached = self.input_tokens - self.cached_tokens
        total = uncached * PRICE_INPUT + self.cached_tokens * PRICE_CACHED
        return (total + self.output_tokens * PRICE_OUTPUT) / Decimal(1_000_000)


TURNS = [
    # responses-reasoning-tool.sse: the exec_command call; costs 0.002728.
    Turn("resp_fx_tool", 5120, 4864, 180, 128),
    # responses-text.sse: the final answer; costs 0.114295.
    Turn("resp_fx_text", 1252, 0, 11273, 10944),
]


@dataclass
class CodexRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="session")
def codex_bin() -> Path:
    """The Codex CLI that `npm install` put next to package.json; missing is a failure."""
    binary = ROOT / "node_modules" / ".bin" / "codex"
    manifest = ROOT / "node_modules" / "@openai" / "codex" / "package.json"
    if not binary.exists() or not manifest.exists():
        pytest.fail(
            f"The Codex CLI is not installed at {binary}. "
            f"Run `npm install --no-package-lock` in {ROOT} first."
        )
    version = json.loads(manifest.read_text(encoding="utf-8"))["version"]
    if version != CODEX_VERSION:
        pytest.fail(
            f"node_modules holds Codex {version}, but package.json pins {CODEX_VERSION}. "
            f"Run `npm install --no-package-lock` in {ROOT} again."
        )
    return binary


@pytest.fixture
def codex_home(tmp_path: Path) -> Path:
    """An empty HOME, so no user config, login or history leaks into the run."""
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    return home


# How Codex authenticates to the gateway: the key from an environment variable (what the
# README shows), or from a command, which also makes Codex ask for its model catalog.
ENV_KEY_AUTH = 'env_key="GW_API_KEY"'
COMMAND_AUTH = 'auth={command="printenv", args=["GW_API_KEY"]}'


def codex_args(
    base_url: str,
    *,
    provider_name: str = "gw",
    auth: str = ENV_KEY_AUTH,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`codex exec` arguments; a provider named "OpenAI" gets Codex's remote compaction."""
    provider = (
        f'model_providers.gw={{name="{provider_name}", '
        f'base_url="{base_url}", {auth}, wire_api="responses", '
        'http_headers={"x-sandbox-transcript"="tool-conversation"}, '
        "request_max_retries=0, stream_max_retries=0, stream_idle_timeout_ms=20000}"
    )
    overrides = [
        *extra,
        "model_provider=gw",
        provider,
        "analytics.enabled=false",
        'otel.metrics_exporter="none"',
        "feedback.enabled=false",
        "features.plugins=false",
        "features.apps=false",
        "check_for_update_on_startup=false",
    ]
    args = ["exec", "--skip-git-repo-check", "--color", "never", "-m", MODEL]
    args += ["-s", "danger-full-access"]
    for override in overrides:
        args += ["-c", override]
    return [*args, PROMPT]


def run_codex(
    binary: Path, base_url: str, key: str, home: Path, workdir: Path, **options: Any
) -> CodexRun:
    """Run `codex exec` with nothing inherited but PATH; stdin must be /dev/null or it waits.

    `options` go to `codex_args`."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "GW_API_KEY": key,
        "LANG": "C.UTF-8",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(binary), *codex_args(base_url, **options)],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CODEX_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The node wrapper starts the native binary as a child: end the whole group we made.
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"codex exec did not finish within {CODEX_TIMEOUT}s:\n{err.decode()}")
    return CodexRun(
        proc.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def final_text(transcript: str) -> str:
    """The text of the last `response.output_text.done` event in a sandbox transcript."""
    text = ""
    for line in (FIXTURES / "upstream" / transcript).read_text(encoding="utf-8").splitlines():
        if not line.startswith("data: "):
            continue
        event = json.loads(line.removeprefix("data: "))
        if event.get("type") == "response.output_text.done":
            text = event["text"]
    assert text, f"{transcript} has no response.output_text.done event"
    return text


def user_usage_rows(gateway: Gateway, name: str, count: int) -> list[dict[str, Any]]:
    """The user's usage rows once `count` exist; the last is written after Codex may exit."""
    deadline = time.monotonic() + USAGE_TIMEOUT
    while True:
        rows = [row for row in gateway.usage_rows() if row["user"] == name]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def items_of(body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [item for item in body["input"] if item.get("type") == kind]


def assert_tool_history(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Turn 2 replays turn 1's input, then the tool call and its output under one call id."""
    assert not items_of(first, "function_call_output")
    assert second["input"][: len(first["input"])] == first["input"]
    calls = items_of(second, "function_call")
    outputs = items_of(second, "function_call_output")
    assert [(call["call_id"], call["name"]) for call in calls] == [(CALL_ID, "exec_command")]
    assert [output["call_id"] for output in outputs] == [CALL_ID]
    assert WORK_FILE in json.dumps(outputs[0]["output"])


def assert_each_turn_billed(
    gateway: Gateway, name: str, balance_before: Decimal
) -> list[dict[str, Any]]:
    """One completed row per turn, to the token and to the last digit; the user's rows."""
    rows = user_usage_rows(gateway, name, len(TURNS))
    by_response = {row["response_id"]: row for row in rows}
    assert len(rows) == len(TURNS)
    assert sorted(by_response) == sorted(turn.response_id for turn in TURNS)
    for turn in TURNS:
        row = by_response[turn.response_id]
        assert row["status"] == "completed", row
        assert row["model"] == MODEL
        assert row["upstream_model"] == "gpt-5.1-codex-2025-11-13"
        assert row["flags"] == []
        assert row["input_tokens"] == turn.input_tokens
        assert row["cached_tokens"] == turn.cached_tokens
        assert row["output_tokens"] == turn.output_tokens
        assert row["reasoning_tokens"] == turn.reasoning_tokens
        assert Decimal(row["cost_usd"]) == turn.cost
    charged = sum((turn.cost for turn in TURNS), Decimal(0))
    assert balance_before - Decimal(gateway.balance(name)) == charged
    return rows


def test_codex_exec_tool_conversation_is_relayed_and_both_turns_billed(
    gateway: Gateway, sandbox: Sandbox, codex_bin: Path, codex_home: Path, tmp_path: Path
) -> None:
    name, key = gateway.new_user("5")
    balance_before = Decimal(gateway.balance(name))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / WORK_FILE).write_text("hello\n", encoding="utf-8")
    sandbox.clear()

    run = run_codex(codex_bin, gateway.url + "/v1", key, codex_home, workdir)

    assert run.returncode == 0, f"codex exec exited {run.returncode}:\n{run.stderr}"
    assert final_text("responses-text.sse") in run.stdout

    # What reached the upstream: two turns, Codex's bodies, the account's key.
    seen = sandbox.requests()
    assert len(seen) == 2, [request["path"] for request in seen]
    bodies = [json.loads(request["body"]) for request in seen]
    for request, body in zip(seen, bodies, strict=True):
        assert isinstance(body, dict)
        assert body.keys() >= CODEX_BODY_KEYS
        assert body["model"] == MODEL
        assert body["store"] is False
        assert body["stream"] is True
        assert request["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert request["headers"]["x-sandbox-transcript"] == "tool-conversation"
        assert request["headers"]["originator"] == "codex_exec"
        assert key not in json.dumps(request)

    first, second = bodies
    assert second["prompt_cache_key"] == first["prompt_cache_key"]
    assert_tool_history(first, second)
    assert_each_turn_billed(gateway, name, balance_before)

    log = gateway.log_text()
    assert key not in log
    assert UPSTREAM_KEY not in log
