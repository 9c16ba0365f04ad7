"""SIGTERM while streams are in flight: they finish and are billed; streams still running at
the end of the grace period end with an error event saying the gateway is shutting down; a
second SIGTERM ends at once and still loses no usage record (the spool is replayed at the
next start)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from codex_gateway.http.server import (
    CANCEL_LINE,
    SWITCH_INTERVAL_SECONDS,
    UVICORN_LOGGER,
    YOUNG_GENERATION_THRESHOLD,
    GracefulServer,
    OrderlyCancel,
)
from codex_gateway.relay.sse import parse_events
from tests.conftest import Gateway, Sandbox, make_gateway
from tests.http.test_operations import add_sandbox_account
from tests.http.test_responses import expected_cost

STREAMS = 10
BODIES = {
    "/v1/responses": {"model": "gpt-5.1-codex", "input": "hi", "stream": True},
    "/v1/chat/completions": {
        "model": "gpt-5.1-codex",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    },
}
TEXT_COUNTS = (1252, 0, 11273, 10944)  # responses-text: input, cached, output, reasoning


@dataclass
class Client:
    """One streaming request on its own thread: its request id, body and any error."""

    url: str
    key: str
    delay_ms: int
    path: str = "/v1/responses"
    started: threading.Event = field(default_factory=threading.Event)
    request_id: str = ""
    body: bytes = b""
    error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                self.url + self.path,
                headers={
                    "Authorization": f"Bearer {self.key}",
                    "x-sandbox-delay-ms": str(self.delay_ms),
                },
                json=BODIES[self.path],
                timeout=60,
            ) as response:
                self.request_id = response.headers["x-request-id"]
                self.started.set()
                for chunk in response.iter_raw():
                    self.body += chunk
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()


def running_gateway(
    sandbox: Sandbox,
    tmp_path_factory: pytest.TempPathFactory,
    grace_seconds: int,
    backend: str = "postgresql",
) -> Iterator[Gateway]:
    gw = make_gateway(backend, tmp_path_factory)
    gw.env["CODEX_GATEWAY_SHUTDOWN_GRACE_SECONDS"] = str(grace_seconds)
    try:
        add_sandbox_account(gw, sandbox)
        gw.start(log_level="INFO")
        yield gw
    finally:
        gw.stop()
        gw.drop_database()


@pytest.fixture
def pg_gateway(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from running_gateway(sandbox, tmp_path_factory, grace_seconds=30)


@pytest.fixture
def sqlite_gateway(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from running_gateway(sandbox, tmp_path_factory, grace_seconds=30, backend="sqlite")


@pytest.fixture
def impatient_gateway(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    yield from running_gateway(sandbox, tmp_path_factory, grace_seconds=1)


def start_streams(
    gw: Gateway, key: str, delay_ms: int, path: str = "/v1/responses"
) -> tuple[list[Client], list[threading.Thread]]:
    clients = [Client(gw.url, key, delay_ms, path) for _ in range(STREAMS)]
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    for client in clients:
        assert client.started.wait(20)
        assert client.error is None, client.error
    return clients, threads


def exit_code(gw: Gateway, timeout: float) -> int:
    assert gw.proc is not None
    return gw.proc.popen.wait(timeout)


def test_sigterm_lets_ten_streams_finish_bills_them_all_and_exits_0(pg_gateway: Gateway) -> None:
    user, key = pg_gateway.new_user("10")
    assert pg_gateway.proc is not None
    clients, threads = start_streams(pg_gateway, key, delay_ms=120)

    pg_gateway.proc.popen.send_signal(signal.SIGTERM)
    time.sleep(0.6)
    with pytest.raises(httpx.ConnectError):
        httpx.get(pg_gateway.url + "/healthz", timeout=2)
    for thread in threads:
        thread.join(30)
    code = exit_code(pg_gateway, 30)

    assert code == 0, pg_gateway.log_text()
    for client in clients:
        assert client.error is None, client.error
        assert b"event: response.completed" in client.body
        assert b"stream_incomplete" not in client.body
    rows = {row["request_id"]: row for row in pg_gateway.usage_rows()}
    assert sorted(rows) == sorted(client.request_id for client in clients)
    for row in rows.values():
        assert row["status"] == "completed"
        assert Decimal(row["cost_usd"]) == expected_cost(TEXT_COUNTS)
    assert Decimal(pg_gateway.balance(user)) == Decimal(10) - STREAMS * expected_cost(TEXT_COUNTS)
    assert "Traceback" not in pg_gateway.log_text()


def test_a_second_sigterm_exits_at_once_and_the_spool_keeps_every_usage_record(
    pg_gateway: Gateway,
) -> None:
    _, key = pg_gateway.new_user("10")
    assert pg_gateway.proc is not None
    spool = pg_gateway.workdir / "unsettled-usage.jsonl"
    clients, threads = start_streams(pg_gateway, key, delay_ms=1500)

    pg_gateway.proc.popen.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    pg_gateway.proc.popen.send_signal(signal.SIGTERM)
    code = exit_code(pg_gateway, 10)
    for thread in threads:
        thread.join(10)
    log = pg_gateway.log_text()
    spooled = spool.read_text(encoding="utf-8").count("\n")
    pg_gateway.start(log_level="INFO")  # the next start replays the spool before it serves
    rows = pg_gateway.usage_rows()

    assert code == 128 + signal.SIGTERM, pg_gateway.log_text()
    assert spooled == STREAMS
    # Their bills were not queued yet: each request spooled its own as it was cut.
    assert (
        f"0 bill(s) waiting to be written went to the spool, and the {STREAMS} request(s) in "
        "flight spool theirs as they end" in log
    )
    for client in clients:
        assert b"event: response.completed" not in client.body
    assert sorted(row["request_id"] for row in rows) == sorted(c.request_id for c in clients)
    assert {row["status"] for row in rows} == {"cancelled"}
    assert not spool.exists()
    assert "Traceback" not in log and "CancelledError" not in log


def test_a_sigterm_with_nothing_in_flight_exits_0(sqlite_gateway: Gateway) -> None:
    assert sqlite_gateway.proc is not None

    sqlite_gateway.proc.popen.send_signal(signal.SIGTERM)

    assert exit_code(sqlite_gateway, 20) == 0, sqlite_gateway.log_text()
    assert "Traceback" not in sqlite_gateway.log_text()


# the second signal, and the status of the drain it cuts: 128 plus its number, as a shell
# reports a process that signal ended
SECOND_SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]


def cut_the_drain(gw: Gateway, second: int) -> tuple[bool, int, Client]:
    """One slow stream in flight, SIGTERM, then `second`: whether the drain was still waiting
    for the stream when `second` came, the exit status, and the client once it is done."""
    _, key = gw.new_user("10")
    assert gw.proc is not None
    slow = Client(gw.url, key, delay_ms=1500)
    thread = threading.Thread(target=slow.run)
    thread.start()
    assert slow.started.wait(20) and slow.error is None, slow.error
    gw.proc.popen.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    draining = gw.proc.popen.poll() is None
    gw.proc.popen.send_signal(second)
    code = exit_code(gw, 20)
    thread.join(10)
    return draining, code, slow


@pytest.mark.parametrize(("second", "status"), SECOND_SIGNALS)
def test_a_drain_cut_by_a_second_signal_exits_128_plus_its_number(
    sqlite_gateway: Gateway, second: signal.Signals, status: int
) -> None:
    draining, code, slow = cut_the_drain(sqlite_gateway, second)

    assert draining, "the drain did not wait for the stream in flight"
    assert code == status, sqlite_gateway.log_text()
    assert b"event: response.completed" not in slow.body
    assert "Traceback" not in sqlite_gateway.log_text()


def shut_down(
    gw: Gateway, threads: list[threading.Thread]
) -> tuple[int, list[dict[str, Any]], str]:
    """SIGTERM, then the exit code, the usage rows and the log once the clients are done."""
    assert gw.proc is not None
    gw.proc.popen.send_signal(signal.SIGTERM)
    code = exit_code(gw, 20)
    for thread in threads:
        thread.join(10)
    return code, gw.usage_rows(), gw.log_text()


def shutdown_error(path: str, body: bytes) -> dict[str, Any]:
    """The one error a cut stream ends with, in the shape of its endpoint's stream."""
    if path == "/v1/chat/completions":
        lines = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert lines[-1] == b"data: [DONE]"
        errors = [line for line in lines if line.startswith(b'data: {"error"')]
        assert errors == [lines[-2]]
        return dict(orjson.loads(errors[0][len(b"data: ") :])["error"])
    events = parse_events(body)
    assert [event for event in events if event.get("type") == "error"] == [events[-1]]
    return dict(events[-1])


@pytest.mark.parametrize("path", list(BODIES))
def test_streams_still_running_at_the_grace_limit_are_cut_and_billed_as_cancelled(
    impatient_gateway: Gateway, path: str
) -> None:
    _, key = impatient_gateway.new_user("10")
    assert impatient_gateway.proc is not None
    clients, threads = start_streams(impatient_gateway, key, delay_ms=1500, path=path)

    code, rows, log = shut_down(impatient_gateway, threads)

    assert code == 0, log
    assert sorted(row["request_id"] for row in rows) == sorted(c.request_id for c in clients)
    assert {row["status"] for row in rows} == {"cancelled"}
    assert not (impatient_gateway.workdir / "unsettled-usage.jsonl").exists()
    for client in clients:  # each stream ends with one error saying why, and one log line
        assert client.error is None, client.error
        error = shutdown_error(path, client.body)
        assert error["code"] == "gateway_shutting_down"
        assert "shutting down" in error["message"]
        cut = [line for line in log.splitlines() if "cut by the shutdown" in line]
        assert len([line for line in cut if client.request_id in line]) == 1, log
    assert "Traceback" not in log and "CancelledError" not in log
    assert " ERROR " not in log  # the cancelling line included: an orderly shutdown
    assert f"WARNING uvicorn.error Cancel {STREAMS} running task(s)" in log


def test_a_request_whose_body_is_still_coming_at_the_grace_limit_gets_a_503(
    impatient_gateway: Gateway,
) -> None:
    """The cancel reaches the request while its body is read, before any relay has it: an
    OpenAI-shaped 503 and one log line, no traceback, and nothing billed."""
    name, key = impatient_gateway.new_user("10")
    assert impatient_gateway.proc is not None
    port = int(impatient_gateway.url.rsplit(":", 1)[1])
    # With `Expect: 100-continue` the server says "continue" once the gateway asks for the
    # body, that is once the key has been checked.
    head = (
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    reading = threading.Event()
    answer = bytearray()

    def post_half_a_body() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(head.encode())
            while not answer.endswith(b"\r\n\r\n"):
                answer.extend(conn.recv(1))
            answer.clear()
            conn.sendall(b'{"model": "gpt-5.1-codex", ')
            reading.set()
            while chunk := conn.recv(65536):
                answer.extend(chunk)

    thread = threading.Thread(target=post_half_a_body)
    thread.start()
    assert reading.wait(20), impatient_gateway.log_text()
    code, rows, log = shut_down(impatient_gateway, [thread])

    assert code == 0, log
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", bytes(answer)
    error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "gateway_shutting_down"
    assert log.count("cut by the shutdown before its answer began") == 1
    assert "Traceback" not in log and "CancelledError" not in log
    assert rows == []
    assert impatient_gateway.balance(name) == "10"


def hanging(sandbox: Sandbox) -> list[dict[str, Any]]:
    return [r for r in sandbox.requests() if r["headers"].get("x-sandbox-fault") == "hang-before"]


@pytest.mark.parametrize("path", list(BODIES))
def test_requests_still_waiting_for_the_upstream_at_the_grace_limit_get_a_503_and_a_row(
    impatient_gateway: Gateway, sandbox: Sandbox, path: str
) -> None:
    """The upstream never answers; the shutdown's cancel reaches the relay before its first
    byte, and each client gets an OpenAI-shaped 503 instead of a traceback and a 500."""
    _, key = impatient_gateway.new_user("10")
    assert impatient_gateway.proc is not None
    answers: list[httpx.Response] = []

    def post() -> None:
        headers = {"Authorization": f"Bearer {key}", "x-sandbox-fault": "hang-before"}
        answers.append(
            httpx.post(impatient_gateway.url + path, headers=headers, json=BODIES[path], timeout=30)
        )

    sandbox.clear()
    threads = [threading.Thread(target=post) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(hanging(sandbox)) < 3:  # every request is at the upstream, waiting for it
        assert time.monotonic() < deadline, sandbox.requests()
        time.sleep(0.05)
    code, rows, log = shut_down(impatient_gateway, threads)

    assert code == 0, log
    assert [answer.status_code for answer in answers] == [503] * 3
    for answer in answers:
        error = answer.json()["error"]
        assert error["code"] == "gateway_shutting_down"
        assert "shutting down" in error["message"]
    assert sorted(row["request_id"] for row in rows) == sorted(
        answer.headers["x-request-id"] for answer in answers
    )
    assert {(row["status"], row["http_status"]) for row in rows} == {("cancelled", 503)}
    for row in rows:  # each names the account it was waiting for
        assert [(a["outcome"], a["error"]) for a in row["attempts"]] == [("cancelled", None)]
        assert row["account"] == row["attempts"][0]["account"]
    assert log.count("cut by the shutdown before its answer began") == 3
    assert "Traceback" not in log and "CancelledError" not in log


async def test_a_started_server_tunes_the_collector_and_the_switch_interval() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request is sent")

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None)
    server = GracefulServer(config, gateway=None)  # type: ignore[arg-type]
    previous = sys.getswitchinterval()
    thresholds = gc.get_threshold()
    gc.unfreeze()
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server did not start"
            await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *thresholds[1:])
    finally:
        server.should_exit = True
        await serving
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(previous)


async def test_requests_cancelled_at_the_grace_limit_are_logged_at_warning_not_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request is sent")

    config = uvicorn.Config(app, lifespan="off", log_config=None, timeout_graceful_shutdown=0)
    config.load()
    server = GracefulServer(config, gateway=None)  # type: ignore[arg-type]
    server.servers, server.lifespan = [], config.lifespan_class(config)  # nothing listens
    running = asyncio.create_task(asyncio.sleep(60))  # a request still in flight
    server.server_state.tasks.add(running)

    with caplog.at_level(logging.INFO, logger=UVICORN_LOGGER):
        await server.shutdown()

    cancelled = [r for r in caplog.records if r.msg == CANCEL_LINE]
    assert [(r.levelname, r.getMessage()) for r in cancelled] == [
        ("WARNING", "Cancel 1 running task(s), timeout graceful shutdown exceeded")
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert running.cancelling()
    assert logging.getLogger(UVICORN_LOGGER).filters == []  # only for the shutdown


@pytest.mark.parametrize(
    ("message", "level", "logged_as"),
    [
        # the cancelling of the requests left at the grace limit
        (CANCEL_LINE, logging.ERROR, "WARNING"),
        # real errors keep their level
        ("Exception in ASGI application\n", logging.ERROR, "ERROR"),
        ("Cancel %s running task(s) after something else", logging.ERROR, "ERROR"),
    ],
)
def test_only_the_grace_limits_cancel_line_is_lowered(
    message: str, level: int, logged_as: str
) -> None:
    record = logging.LogRecord(UVICORN_LOGGER, level, __file__, 1, message, (1,), None)

    assert OrderlyCancel().filter(record) is True
    assert record.levelname == logged_as
    assert record.levelno == logging.getLevelName(logged_as)
