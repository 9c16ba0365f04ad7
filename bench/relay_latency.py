"""Time-to-first-byte and total time of streamed requests, direct to the sandbox and through
a gateway with a pool of accounts (one of them refusing connections, the first in line).

    .venv/bin/python bench/relay_latency.py [--requests 300] [--healthy-only]

Starts a sandbox and a gateway on loopback (SQLite in a temporary directory), sends the
requests one after another, prints medians and p95 in milliseconds, and stops both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import free_port, wait_http

CLI = [sys.executable, "-m", "codex_gateway"]
BODY = {"model": "gpt-5.1-codex", "input": "hi", "stream": True, "prompt_cache_key": "bench"}


def timed(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    with client.stream("POST", url, json=BODY, headers=headers) as response:
        first = None
        for _ in response.iter_raw():
            if first is None:
                first = time.perf_counter() - started
    return (first or 0) * 1000, (time.perf_counter() - started) * 1000


def report(name: str, samples: list[tuple[float, float]]) -> None:
    for label, values in (("ttfb", [s[0] for s in samples]), ("total", [s[1] for s in samples])):
        ordered = sorted(values)
        p95 = ordered[int(len(ordered) * 0.95) - 1]
        print(f"{name:<28} {label:<5} p50 {statistics.median(ordered):7.2f} ms  p95 {p95:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--healthy-only", action="store_true", help="Leave out the refusing account."
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cg-bench-"))
    env = dict(os.environ, CODEX_GATEWAY_DATABASE_URL=f"sqlite:///{workdir}/gw.db")
    sandbox_port, gateway_port = free_port(), free_port()
    procs = [subprocess.Popen([*CLI, "sandbox", "--port", str(sandbox_port)], env=env)]
    try:
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        wait_http(sandbox + "/sandbox/requests")
        accounts = [("a", sandbox + "/v1", "2"), ("b", sandbox + "/v1", "2")]
        if not args.healthy_only:
            accounts.insert(0, ("refused", f"http://127.0.0.1:{free_port()}/v1", "1"))
        for name, base, priority in accounts:
            subprocess.run(
                [
                    *CLI,
                    "accounts",
                    "add",
                    "--name",
                    name,
                    "--base-url",
                    base,
                    "--api-key",
                    f"sk-bench-{name}",
                    "--priority",
                    priority,
                ],
                env=env,
                check=True,
                capture_output=True,
            )
        subprocess.run(
            [*CLI, "users", "create", "bench", "--balance", "100000"],
            env=env,
            check=True,
            capture_output=True,
        )
        key = (
            subprocess.run(
                [*CLI, "keys", "create", "--user", "bench"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        procs.append(
            subprocess.Popen(
                [*CLI, "serve", "--port", str(gateway_port), "--log-level", "WARNING"],
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )
        gateway = f"http://127.0.0.1:{gateway_port}"
        wait_http(gateway + "/healthz")
        with httpx.Client(timeout=30) as client:
            for name, url, headers in (
                ("sandbox direct", sandbox + "/v1/responses", {}),
                (
                    f"gateway ({len(accounts)} accounts)",
                    gateway + "/v1/responses",
                    {"Authorization": f"Bearer {key}"},
                ),
            ):
                for _ in range(20):
                    timed(client, url, headers)
                report(name, [timed(client, url, headers) for _ in range(args.requests)])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
