"""The load generators: wrk for plain requests, the stream client for server-sent events.

Both run on the load core beside the mock upstream and print one JSON object each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procs import LOAD_CORE, PeakMemory, child_env, pinned

HERE = Path(__file__).resolve().parent
STREAM_CLIENT = HERE / "stream_client.py"
MARK = "BENCH_JSON "

# wrk's Lua hooks: post one body with the key, and print the summary as JSON at the end.
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer {key}"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class LoadError(RuntimeError):
    """A load generator did not run, or printed no result."""


def request_body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "input": "hi", "stream": stream}, separators=(",", ":"))


def wrk(
    url: str, key: str, body: str, connections: int, seconds: float, timeout_s: int = 5
) -> dict[str, Any]:
    """One wrk run on the load core; latencies in milliseconds, errors summed."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(body=body, key=key, mark=MARK))
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        script.name,
        url,
    ]
    try:
        done = subprocess.run(
            pinned(argv, LOAD_CORE),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            env=child_env(),
        )
    finally:
        Path(script.name).unlink()
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise LoadError(f"wrk printed no result (exit {done.returncode}): {done.stderr.strip()}")
    raw = json.loads(line[len(MARK) :])
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw[name] for name in ("connect", "read", "write", "status", "timeout"))
    return {
        "connections": connections,
        "requests": raw["requests"],
        "seconds": round(seconds_run, 3),
        "rps": round(raw["requests"] / seconds_run, 1) if seconds_run else 0.0,
        "errors": errors,
        "non_2xx": raw["status"],
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }


def streams(
    url: str,
    key: str,
    model: str,
    concurrency: int,
    *,
    per_connection: int | None = None,
    duration: float | None = None,
    ramp: float = 0.0,
    timeout: float = 120.0,
    watch_pid: int | None = None,
) -> dict[str, Any]:
    """One stream client run on the load core; with `watch_pid`, also that tree's peak RSS."""
    argv = [
        sys.executable,
        str(STREAM_CLIENT),
        "--url",
        url,
        "--key",
        key,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--ramp",
        str(ramp),
        "--timeout",
        str(timeout),
    ]
    if per_connection is not None:
        argv += ["--streams", str(per_connection)]
    else:
        argv += ["--duration", str(duration)]
    command = pinned(argv, LOAD_CORE)
    if watch_pid is None:
        done = _run_client(command, timeout)
        return _client_result(done)
    with PeakMemory(watch_pid) as memory:
        done = _run_client(command, timeout)
    result = _client_result(done)
    result["peak_rss_kb"] = memory.peak_kb
    return result


def _run_client(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout + 30, env=child_env()
    )


def _client_result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if done.returncode != 0 or not done.stdout.strip():
        raise LoadError(f"the stream client failed (exit {done.returncode}): {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
