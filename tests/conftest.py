"""Fixtures that run the real gateway: processes on loopback, SQLite and PostgreSQL.

Only the upstream is a mock (the gateway's own sandbox, run as a separate process). Each
database backend gets a fresh database; each test makes its own user and key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from codex_gateway.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PG_ADMIN_URL = os.environ.get(
    "CODEX_GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CLI = [sys.executable, "-m", "codex_gateway"]
MAX_BODY_BYTES = 1_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:PORT, from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "0A")


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def fixture_path(*parts: str) -> Path:
    """A wire-format fixture (tests/fixtures is a copy of the shared fixtures)."""
    return FIXTURES.joinpath(*parts)


def estimated_counts(input_text: str, events: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """What the gateway bills when usage never came: o200k_base tokens of the request's text
    and of the streamed deltas, as (input, cached, output, reasoning)."""
    import bpe_openai

    encoding = bpe_openai.get_encoding("o200k_base")
    deltas = "".join(
        str(event["delta"]) for event in events if str(event.get("type", "")).endswith(".delta")
    )
    return len(encoding.encode(input_text)), 0, len(encoding.encode(deltas)), 0


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            [*CLI, *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Proc(popen, log)


@dataclass
class Sandbox:
    url: str
    proc: Proc

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/sandbox/requests").json())

    def clear(self) -> None:
        httpx.delete(self.url + "/sandbox/requests")


@dataclass
class Gateway:
    """A running gateway process and the CLI pointed at the same database."""

    backend: str
    database_url: str
    workdir: Path
    env: dict[str, str]
    url: str = ""
    proc: Proc | None = None
    extra_procs: list[Proc] = field(default_factory=list)

    def cli(
        self, *args: str, check: bool = True, stdin: str | bytes | IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this process: the same code as the installed CLI, started faster."""
        result = CliRunner().invoke(
            cli, list(args), input=stdin, env=self.env, catch_exceptions=False
        )
        completed = subprocess.CompletedProcess(
            list(args), result.exit_code, result.stdout, result.stderr
        )
        if check and result.exit_code != 0:
            raise AssertionError(f"codex-gateway {' '.join(args)} failed:\n{result.stderr}")
        return completed

    def real_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the command as its own process, as an operator would."""
        return subprocess.run(
            [*CLI, *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, log_level: str = "DEBUG", workers: int = 1) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.workdir / f"gateway-{port}.log"
        args = ["serve", "--port", str(port), "--log-level", log_level]
        self.proc = spawn([*args, "--workers", str(workers)], self.env, log)
        wait_http(self.url + "/healthz")
        # Every worker listening, not only the first (which answers /healthz alone).
        deadline = time.monotonic() + 30
        while listeners(port) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {workers} workers listen:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in [self.proc, *self.extra_procs]:
            if proc is not None:
                proc.stop()

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def drop_database(self) -> None:
        if self.backend == "postgresql":
            _drop_pg_database(self.database_url.rsplit("/", 1)[1])

    def new_user(self, balance: str = "10") -> tuple[str, str]:
        """A fresh user with `balance` USD and a key; returns (name, key)."""
        name = "u" + uuid.uuid4().hex[:10]
        self.cli("users", "create", name, "--balance", balance)
        key = self.cli("keys", "create", "--user", name).stdout.strip().splitlines()[-1]
        return name, key

    def balance(self, name: str) -> str:
        users = self.cli_json("users", "list")
        return next(str(u["balance"]) for u in users if u["name"] == name)

    def usage_rows(self) -> list[dict[str, Any]]:
        return list(self.cli_json("usage", "list", "--limit", "1000"))

    def usage_row(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The usage row for `request_id`, waiting for the write that follows the last byte."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.cli("explain", request_id, "--json", check=False)
            if result.returncode == 0:
                return dict(json.loads(result.stdout))
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage row for {request_id}: {result.stderr}")
            time.sleep(0.1)


def _create_pg_database() -> tuple[str, str]:
    name = "cg_test_" + uuid.uuid4().hex[:12]
    subprocess.run(
        ["psql", PG_ADMIN_URL, "-qc", f'CREATE DATABASE "{name}"'], check=True, capture_output=True
    )
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop_pg_database(name: str) -> None:
    subprocess.run(
        ["psql", PG_ADMIN_URL, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
        capture_output=True,
    )


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from run_sandbox(tmp_path_factory.mktemp("sandbox"))


def run_sandbox(log_dir: Path) -> Iterator[Sandbox]:
    """A recording sandbox upstream process, stopped when the generator is closed."""
    port = free_port()
    proc = spawn(["sandbox", "--port", str(port)], dict(os.environ), log_dir / "sandbox.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/sandbox/requests")
        yield Sandbox(url, proc)
    finally:
        proc.stop()


@pytest.fixture
def sdk(gateway: Gateway) -> Iterator[Callable[[str], openai.OpenAI]]:
    """Make SDK clients for a key; every client is closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def add_sandbox_account(
    gw: Gateway, sandbox: Sandbox, api_key: str = "sk-upstream-secret-0001"
) -> None:
    """An openai account named `sandbox` that relays to the sandbox upstream."""
    gw.cli(
        "accounts", "add", "--name", "sandbox", "--kind", "openai",
        "--base-url", sandbox.base_url, "--api-key", api_key,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway process on a fresh database of each backend, relaying to the sandbox."""
    yield from running_gateway(request.param, sandbox, tmp_path_factory)


def running_gateway(
    backend: str,
    sandbox: Sandbox,
    tmp_path_factory: pytest.TempPathFactory,
    workers: int = 1,
) -> Iterator[Gateway]:
    """A gateway on a fresh database relaying to the sandbox, stopped and dropped after."""
    gw = make_gateway(backend, tmp_path_factory)
    try:
        add_sandbox_account(gw, sandbox)
        gw.start(workers=workers)
        yield gw
    finally:
        gw.stop()
        gw.drop_database()


def make_gateway(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    workdir = tmp_path_factory.mktemp(f"gw-{backend}")
    if backend == "sqlite":
        database_url = f"sqlite:///{workdir}/gateway.db"
    else:
        _, database_url = _create_pg_database()
    env = dict(os.environ)
    env.update(
        {
            "CODEX_GATEWAY_DATABASE_URL": database_url,
            "CODEX_GATEWAY_CATALOG_REFRESH_SECONDS": "0.2",
            "CODEX_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "CODEX_GATEWAY_SPOOL_PATH": str(workdir / "unsettled-usage.jsonl"),
        }
    )
    return Gateway(backend, database_url, workdir, env)


@pytest.fixture(params=["sqlite", "postgresql"])
def keyless_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway, not started, of a database of its own with nothing in it and no secret key
    set; stopped and dropped after."""
    gateway = make_gateway(request.param, tmp_path_factory)
    for name in ("CODEX_GATEWAY_SECRET_KEY", "CODEX_GATEWAY_SECRET_KEY_FILE"):
        gateway.env.pop(name, None)
    try:
        yield gateway
    finally:
        gateway.stop()
        gateway.drop_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend, for tests that open engines themselves."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    name, url = _create_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)
