"""Median client latency, /v1/responses vs /v1/chat/completions, same sandbox transcript.

Starts a sandbox upstream and a gateway on loopback (SQLite in a temporary directory),
sends 220 requests of each kind one after another, and drops the first 20 as warm-up.
Run from the repository root: .venv/bin/python -m bench.chat_latency
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import CLI, Proc, free_port, spawn, wait_http

REQUESTS, WARM_UP = 220, 20
CHAT = {"model": "gpt-5.1-codex", "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "gpt-5.1-codex", "input": "hi"}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "responses stream": ("/v1/responses", {**RESPONSES, "stream": True}),
    "chat stream": (
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ),
    "responses json": ("/v1/responses", RESPONSES),
    "chat json": ("/v1/chat/completions", CHAT),
}


def main() -> None:
    work = Path(tempfile.mkdtemp())
    env = dict(os.environ, CODEX_GATEWAY_DATABASE_URL=f"sqlite:///{work}/gw.db")
    sandbox_port, gateway_port = free_port(), free_port()
    procs: list[Proc] = [spawn(["sandbox", "--port", str(sandbox_port)], env, work / "sb.log")]
    try:
        wait_http(f"http://127.0.0.1:{sandbox_port}/sandbox/requests")
        key = _prepare(env, f"http://127.0.0.1:{sandbox_port}/v1")
        args = ["serve", "--port", str(gateway_port), "--log-level", "WARNING"]
        procs.append(spawn(args, env, work / "gw.log"))
        wait_http(f"http://127.0.0.1:{gateway_port}/healthz")
        _measure(f"http://127.0.0.1:{gateway_port}", key)
    finally:
        for proc in procs:
            proc.stop()


def _prepare(env: dict[str, str], upstream: str) -> str:
    def cli(*args: str) -> str:
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, check=True)
        return done.stdout

    cli("accounts", "add", "--name", "sb", "--base-url", upstream, "--api-key", "sk-x")
    cli("users", "create", "bench", "--balance", "1000")
    return cli("keys", "create", "--user", "bench").strip().splitlines()[-1]


def _measure(url: str, key: str) -> None:
    headers = {"authorization": f"Bearer {key}", "x-sandbox-transcript": "responses-text"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, (path, body) in CASES.items():
            times = []
            for index in range(REQUESTS):
                started = time.perf_counter()
                response = client.post(path, json=body, headers=headers)
                response.read()
                elapsed = (time.perf_counter() - started) * 1000
                assert response.status_code == 200, response.text
                if index >= WARM_UP:
                    times.append(elapsed)
            median, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
            print(f"{name:18s} median {median:.2f} ms  p90 {p90:.2f} ms  ({len(times)} requests)")


if __name__ == "__main__":
    main()
