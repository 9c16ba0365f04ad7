"""`codex-gateway serve`: the quick start (`--sandbox`) from an empty directory, and a first
start on a PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from codex_gateway.store.db import create_engine
from codex_gateway.store.queries import Store
from codex_gateway.upstream.sealing import TokenCipher
from tests.cli.conftest import schema_at
from tests.conftest import CLI, fixture_path, free_port, wait_http


def start(
    workdir: Path, port: int, sandbox: bool = True, workers: int = 1, **settings: str
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
    env.update(settings)
    options = ["--port", str(port), "--workers", str(workers)]
    return subprocess.Popen(
        [*CLI, "serve", *(["--sandbox"] if sandbox else []), *options],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    output, _ = proc.communicate(timeout=15)
    return output


def run_cli(workdir: Path, *args: str, **settings: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
    env.update(settings)
    result = subprocess.run(
        [*CLI, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def guide_request(port: int, key: str) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/responses",
        content=fixture_path("requests", "seed-guide-request.json").read_bytes(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )


def test_quick_start_answers_bills_and_survives_a_restart_on_another_port(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = start(tmp_path, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        response = guide_request(port, "placeholder")
        assert response.status_code == 401
    finally:
        first_output = stop(proc)
    key = next(line for line in first_output.splitlines() if line.startswith("sk-cg-"))
    assert f"serving on http://127.0.0.1:{port}\n" in first_output
    assert (tmp_path / "data" / "codex-gateway.db").exists()

    port = free_port()
    proc = start(tmp_path, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        response = guide_request(port, key)
        assert response.status_code == 200
        assert b"event: response.completed" in response.content
        request_id = response.headers["x-request-id"]
        # The sandbox in a serving gateway keeps no record of users' requests.
        assert httpx.get(f"http://127.0.0.1:{port}/sandbox/requests").status_code == 404
    finally:
        second_output = stop(proc)
    assert key not in second_output
    assert "API key (shown once)" not in second_output
    deadline = time.monotonic() + 10
    while "total charged: $0.114295" not in (text := _explain(tmp_path, request_id)):
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    users = run_cli(tmp_path, "users", "list", "--json")
    assert '"balance": "4.885705"' in users
    assert Decimal("5") - Decimal("0.114295") == Decimal("4.885705")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sandbox", [False, True])
def test_serve_says_it_is_serving_only_once_it_is(
    sandbox: bool, workers: int, tmp_path: Path
) -> None:
    """A database that cannot be opened stops the start before anything listens, so no
    `serving on` line is printed; one that opens is followed by the line."""
    port = free_port()
    unreachable = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/cg_test_unreachable"
    proc = start(tmp_path, port, sandbox, workers, CODEX_GATEWAY_DATABASE_URL=unreachable)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    assert "[Errno 111]" in output
    assert "serving on" not in output

    proc = start(tmp_path, port, sandbox, workers)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        output = stop(proc)
    assert output.count(f"serving on http://127.0.0.1:{port}\n") == 1, output


@pytest.mark.parametrize("sandbox", [False, True])
def test_serve_creates_a_postgresql_database_the_server_does_not_have_yet(
    missing_database: str, sandbox: bool, tmp_path: Path
) -> None:
    port = free_port()
    proc = start(tmp_path, port, sandbox, CODEX_GATEWAY_DATABASE_URL=missing_database)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        output = stop(proc)

    assert "Application startup complete" in output
    assert schema_at(missing_database) == "current"


def test_a_keyless_quick_start_still_answers_after_the_api_keys_are_sealed(
    tmp_path: Path,
) -> None:
    """`accounts seal` leaves the sandbox's placeholder key in clear, and a quick start gives
    it back in clear should an earlier `accounts seal` have sealed it."""
    port = free_port()
    proc = start(tmp_path, port)
    try:
        key = next(line for line in _lines_until_key(proc) if line.startswith("sk-cg-"))
    finally:
        stop(proc)
    secret = "operator-secret-key-0123456789abcdef"
    sealed_now = run_cli(tmp_path, "accounts", "seal", CODEX_GATEWAY_SECRET_KEY=secret)
    asyncio.run(_seal_every_key(tmp_path / "data" / "codex-gateway.db", TokenCipher(secret)))

    proc = start(tmp_path, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        response = guide_request(port, key)
    finally:
        stop(proc)

    assert sealed_now == "every API key is sealed already\n"
    assert response.status_code == 200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_gateway_that_cannot_listen_leaves_the_running_ones_upstream_alone(
    tmp_path: Path, workers: str
) -> None:
    port = free_port()
    proc = start(tmp_path, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        key = next(line for line in _lines_until_key(proc) if line.startswith("sk-cg-"))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            other = taken.getsockname()[1]
            env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
            args = ["serve", "--sandbox", "--port", str(other), "--workers", workers]
            failed = subprocess.run(
                [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
            )
        assert failed.returncode == 1
        assert f"cannot listen on 127.0.0.1:{other}" in failed.stderr
        accounts = run_cli(tmp_path, "accounts", "list", "--json")
        assert f"127.0.0.1:{port}/sandbox/v1" in accounts
        assert str(other) not in accounts
        # The running gateway still relays to its own sandbox.
        assert guide_request(port, key).status_code == 200
    finally:
        stop(proc)


def test_the_quick_starts_fault_switch_takes_a_gateway_key(tmp_path: Path) -> None:
    """The sandbox account's upstream key is the word `sandbox`, so a fault set for it fails
    every user's requests: only a caller with a gateway key may set one."""
    port = free_port()
    proc = start(tmp_path, port)
    faults = f"http://127.0.0.1:{port}/sandbox/faults"
    fault = {"key": "sandbox", "fault": "500"}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        key = next(line for line in _lines_until_key(proc) if line.startswith("sk-cg-"))
        for headers in ({}, {"Authorization": "Bearer sk-cg-not-a-real-key-000000000000"}):
            refused = httpx.put(faults, json=fault, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert guide_request(port, key).status_code == 200
        badly_formed = httpx.put(faults, content=b"{", headers={"Authorization": f"Bearer {key}"})
        assert badly_formed.status_code == 400
        assert badly_formed.json()["error"]["message"].startswith("The sandbox expects a JSON")

        applied = httpx.put(faults, json=fault, headers={"Authorization": f"Bearer {key}"})
        assert applied.status_code == 200
        assert applied.json() == fault
        assert guide_request(port, key).status_code == 502
    finally:
        stop(proc)


# settings serve would fail on once started, the line it refuses them with instead
UNUSABLE = [
    # a secret key file that gives no key (serve reads it to open ChatGPT tokens)
    (
        {"CODEX_GATEWAY_SECRET_KEY_FILE": "missing-key"},
        "error: setting secret_key_file = 'missing-key': cannot be read: No such file or directory",
    ),
    (
        {"CODEX_GATEWAY_SECRET_KEY_FILE": "data"},
        "error: setting secret_key_file = 'data': cannot be read: Is a directory",
    ),
    (
        {"CODEX_GATEWAY_SECRET_KEY_FILE": "short-key"},
        "error: setting secret_key_file = 'short-key': the key in it must be at least 32 "
        "characters long",
    ),
    # a folder for hold journals or the spool that cannot be one
    (
        {"CODEX_GATEWAY_JOURNAL_DIR": "short-key"},
        "error: setting journal_dir = 'short-key': short-key is not a folder",
    ),
    (
        {"CODEX_GATEWAY_SPOOL_PATH": "short-key/spool.jsonl"},
        "error: setting spool_path = 'short-key/spool.jsonl': short-key is not a folder",
    ),
]


@pytest.mark.parametrize(("settings", "refusal"), UNUSABLE)
def test_the_quick_start_refuses_unusable_files_before_it_creates_the_demo_user(
    tmp_path: Path, settings: dict[str, str], refusal: str
) -> None:
    """It refuses before it listens, points the sandbox account at itself or creates the demo
    user and prints its key, so that a second try with the file fixed is a fresh quick start."""
    (tmp_path / "short-key").write_text("too-short\n")
    assert run_cli(tmp_path, "users", "list", "--json").strip() == "[]"  # the database exists

    proc = start(tmp_path, free_port(), **settings)
    output, _ = proc.communicate(timeout=60)

    assert proc.returncode == 1
    assert output.splitlines() == [refusal]
    assert run_cli(tmp_path, "users", "list", "--json").strip() == "[]"
    assert run_cli(tmp_path, "accounts", "list", "--json").strip() == "[]"


async def _seal_every_key(database: Path, cipher: TokenCipher) -> None:
    """Seal every API key in clear, the sandbox's too, as `accounts seal` once did."""
    engine = create_engine(f"sqlite:///{database}")
    try:
        assert await Store(engine).seal_api_keys("openai", cipher.seal) == ["sandbox"]
    finally:
        await engine.dispose()


def _lines_until_key(proc: subprocess.Popen[str]) -> list[str]:
    """The quick start's output up to the demo key, which it prints once at start."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("sk-cg-"):
        line = proc.stdout.readline()
        assert line, "the gateway printed no key"
        lines.append(line.strip())
    return lines


def _explain(workdir: Path, request_id: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
    result = subprocess.run(
        [*CLI, "explain", request_id], cwd=workdir, env=env, capture_output=True, text=True
    )
    return result.stdout


def test_workers_do_not_share_a_port_with_another_gateways_workers(tmp_path: Path) -> None:
    """Listeners with SO_REUSEPORT, as another `serve --workers` leaves, hold the port: a
    second gateway started on it is refused instead of taking part of its connections."""
    with socket.socket() as other_workers:
        other_workers.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other_workers.bind(("127.0.0.1", 0))
        other_workers.listen()
        port = other_workers.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_GATEWAY_")}
        failed = subprocess.run(
            [*CLI, "serve", "--sandbox", "--port", str(port), "--workers", "2"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert failed.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in failed.stderr


def test_a_quick_start_stream_cut_by_the_shutdown_logs_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    """The built-in sandbox is cut by the same shutdown as the stream it serves; neither
    leaves a traceback in the log."""
    port = free_port()
    proc = start(tmp_path, port, CODEX_GATEWAY_SHUTDOWN_GRACE_SECONDS="1")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert proc.stdout is not None
        key = next(line for line in iter(proc.stdout.readline, "") if line.startswith("sk-cg-"))
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/responses",
            json={"model": "gpt-5.1-codex", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {key.strip()}", "x-sandbox-delay-ms": "1000"},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            proc.terminate()
            body = b"".join(response.iter_raw())
        output, _ = proc.communicate(timeout=15)  # one SIGTERM: a second would cut the drain
    finally:
        if proc.poll() is None:
            stop(proc)

    assert proc.returncode == 0, output
    assert b"gateway_shutting_down" in body
    assert output.count("stream cut by the shutdown") == 1, output
    assert "Traceback" not in output and "CancelledError" not in output, output
