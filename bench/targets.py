"""What a benchmark row sends its load to: the mock itself, codex-gateway, or LiteLLM.

Each target is a context manager that sets the proxy up on the proxy core, yields where to
send requests and which process to watch, and takes everything down again. A target that
cannot be had on this machine raises `Unavailable`, and its row says why.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.procs import PROXY_CORE, Processes, child_env

HERE = Path(__file__).resolve().parent
LITELLM_VENV = HERE / ".litellm-venv"
LITELLM_REQUIREMENTS = HERE / "litellm-requirements.txt"
LITELLM_KEY = "sk-bench-litellm-master-key"
MODELS = ("bench-model", "bench-paced")
# USD per 1M tokens; low enough that a long run never exhausts the bench user's balance.
PRICE = ("--input", "1", "--cached-input", "0.1", "--output", "2")
BALANCE = "1000000"
# Loopback only: a request through this opener never goes to an environment proxy.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Requests held back until the usage writer caught up, and requests paced to give it time.
WRITER_COUNTS = {
    "writer_waits": "codex_gateway_writer_waits_total",
    "writer_paces": "codex_gateway_writer_paces_total",
}


def writer_counts(target: Target) -> dict[str, int] | None:
    """The gateway's counts so far of requests that waited for its usage writer; None for a
    row that has no such counts, or when /metrics did not give them."""
    if target.metrics is None:
        return None
    url, token = target.metrics
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with _LOCAL.open(request, timeout=5) as answer:
            text = answer.read().decode()
        found = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        return {key: int(found[metric]) for key, metric in WRITER_COUNTS.items()}
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None


class Unavailable(Exception):
    """This target cannot run here; the message says why."""


@dataclass
class Target:
    name: str
    label: str
    url: str  # where POST /v1/responses goes
    key: str
    pid: int  # the process tree whose memory and CPU are measured
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # The gateway's /metrics and its admin token, where one process serves every request and
    # so counts them all.
    metrics: tuple[str, str] | None = field(default=None, repr=False)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"the process exited with status {proc.returncode} at start-up")
        try:
            with _LOCAL.open(url, timeout=2) as answer:
                if answer.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise Unavailable(f"{url} did not answer within {timeout:g} s")


@contextmanager
def direct(mock_url: str, mock_pid: int) -> Iterator[Target]:
    yield Target(
        "direct",
        "direct to the mock",
        mock_url + "/responses",
        "none",
        mock_pid,
        notes=["the baseline: the load generator talks to the mock upstream itself"],
    )


@contextmanager
def bare_hop(
    procs: Processes, mock_url: str, port: int, work: Path, cores: str = str(PROXY_CORE)
) -> Iterator[Target]:
    """uvicorn and the gateway's upstream client with nothing in between: a hop's floor."""
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / "bare_hop.py"), "--port", str(port), "--upstream", mock_url]
    proc = procs.start("bare", argv, core=cores, env=child_env(), cwd=work)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
        yield Target(
            "bare",
            "bare Python hop (uvicorn + the gateway's upstream client)",
            f"http://127.0.0.1:{port}/v1/responses",
            "none",
            proc.pid,
            notes=[
                "the floor of a Python hop here: the same server and upstream client as the "
                "gateway, and nothing else (no key, price, hold or bill)"
            ],
        )
    finally:
        procs.stop(proc)


@contextmanager
def gateway(
    procs: Processes,
    backend: str,
    mock_url: str,
    port: int,
    work: Path,
    pg_admin_url: str,
    workers: int,
    cores: str = str(PROXY_CORE),
) -> Iterator[Target]:
    """codex-gateway with billing on (users, keys, prices, holds), SQLite or PostgreSQL."""
    work.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(24)
    database_name = None
    if backend == "sqlite":
        database_url = f"sqlite:///{work}/gateway.db"
    else:
        database_name, database_url = _create_pg_database(pg_admin_url)
    env = child_env(
        {
            "CODEX_GATEWAY_DATABASE_URL": database_url,
            "CODEX_GATEWAY_LOG_LEVEL": "WARNING",
            "CODEX_GATEWAY_SPOOL_PATH": str(work / "unsettled-usage.jsonl"),
            "CODEX_GATEWAY_ADMIN_TOKEN": admin_token,
        }
    )
    try:
        key = _prepare_gateway(env, mock_url)
        argv = [sys.executable, "-m", "codex_gateway", "serve", "--port", str(port)]
        argv += ["--workers", str(workers)] if workers > 1 else []
        proc = procs.start(f"gateway-{backend}", argv, core=cores, env=env, cwd=work)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
            label = (
                f"codex-gateway, billing on, {'SQLite' if backend == 'sqlite' else 'PostgreSQL'}"
            )
            if workers > 1:
                label += f", {workers} workers"
            yield Target(
                f"gateway-{backend}",
                label,
                f"http://127.0.0.1:{port}/v1/responses",
                key,
                proc.pid,
                notes=[
                    "every request authenticated, admitted against the balance (hold), "
                    "relayed, priced and written as a usage row with a ledger debit"
                ],
                # Each worker counts its own requests.
                metrics=(f"http://127.0.0.1:{port}/metrics", admin_token) if workers == 1 else None,
            )
        finally:
            procs.stop(proc)
    finally:
        if database_name is not None:
            _drop_pg_database(pg_admin_url, database_name)


def _prepare_gateway(env: dict[str, str], mock_url: str) -> str:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "codex_gateway", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise Unavailable(f"codex-gateway {args[0]} {args[1]} failed: {done.stderr[-400:]}")
        return done.stdout

    cli("accounts", "add", "--name", "mock", "--base-url", mock_url, "--api-key", "sk-mock")
    for model in MODELS:
        cli("pricing", "set", model, *PRICE)
    cli("users", "create", "bench", "--balance", BALANCE)
    return cli("keys", "create", "--user", "bench").strip().splitlines()[-1]


def _create_pg_database(admin_url: str) -> tuple[str, str]:
    if shutil.which("psql") is None:
        raise Unavailable("psql is not installed, so no PostgreSQL database can be made")
    name = "cg_bench_" + uuid.uuid4().hex[:12]
    done = subprocess.run(
        ["psql", admin_url, "-qc", f'CREATE DATABASE "{name}"'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise Unavailable(f"PostgreSQL at {admin_url} refused: {done.stderr.strip()[:300]}")
    return name, f"{admin_url.rsplit('/', 1)[0]}/{name}"


def _drop_pg_database(admin_url: str, name: str) -> None:
    subprocess.run(
        ["psql", admin_url, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
        capture_output=True,
        timeout=60,
    )


def litellm_version() -> str:
    for line in LITELLM_REQUIREMENTS.read_text().splitlines():
        if line.startswith("litellm"):
            return line.split("==", 1)[1].strip()
    return "?"


def install_litellm(log: Path) -> None:
    """Make bench/.litellm-venv with the pinned LiteLLM, unless it is there already."""
    stamp = LITELLM_VENV / "requirements.sha256"
    wanted = hashlib.sha256(LITELLM_REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print(f"installing LiteLLM {litellm_version()} into {LITELLM_VENV} (once)", flush=True)
    with log.open("ab") as handle:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)],
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "-r", str(LITELLM_REQUIREMENTS)],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, stdout=handle, stderr=subprocess.STDOUT, timeout=1800)
            except subprocess.TimeoutExpired:
                raise Unavailable("installing LiteLLM took longer than 30 minutes") from None
            if done.returncode != 0:
                raise Unavailable(f"installing LiteLLM failed (see {log})")
    stamp.write_text(wanted)


LITELLM_ENV = {
    # Never fetch the model price map, tokenizers or anything else from the internet.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
}


@contextmanager
def litellm(
    procs: Processes,
    mock_url: str,
    port: int,
    work: Path,
    install: bool,
    cores: str = str(PROXY_CORE),
) -> Iterator[Target]:
    """The LiteLLM proxy, one worker, no database, no callbacks, the mock as its upstream."""
    work.mkdir(parents=True, exist_ok=True)
    if install:
        install_litellm(work / "install.log")
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        raise Unavailable(f"LiteLLM is not installed in {LITELLM_VENV} (run without --no-install)")
    config = work / "litellm.json"  # YAML is a superset of JSON
    config.write_text(json.dumps(litellm_config(mock_url), indent=2))
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1", "--telemetry", "False"]
    proc = procs.start("litellm", argv, core=cores, env=child_env(LITELLM_ENV), cwd=work)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180, proc)
        yield Target(
            "litellm",
            f"LiteLLM proxy {litellm_version()}, one worker, no database",
            f"http://127.0.0.1:{port}/v1/responses",
            LITELLM_KEY,
            proc.pid,
            notes=LITELLM_NOTES,
        )
    finally:
        procs.stop(proc)


LITELLM_NOTES = [
    "one uvicorn worker, the mock as an OpenAI upstream for /v1/responses",
    "no database: no virtual keys, no spend tracking, no budgets; one master key checked "
    "from memory",
    "no callbacks, no telemetry, the local model cost map (nothing fetched from the internet)",
    "so it did less than codex-gateway: no per-user balance, no usage rows, no ledger",
]


def litellm_config(mock_url: str) -> dict[str, object]:
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": mock_url,
                    "api_key": "sk-mock",
                },
            }
            for model in MODELS
        ],
        "litellm_settings": {
            "telemetry": False,
            "success_callback": [],
            "failure_callback": [],
            "callbacks": [],
            "drop_params": True,
            "set_verbose": False,
            "json_logs": False,
            "request_timeout": 600,
        },
        "general_settings": {
            "master_key": LITELLM_KEY,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "disable_adding_master_key_hash_to_db": True,
            "background_health_checks": False,
        },
    }
