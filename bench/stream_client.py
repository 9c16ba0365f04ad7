"""A lean streaming load client that timestamps every server-sent event as it arrives.

    python bench/stream_client.py --url http://127.0.0.1:8787/v1/responses --key sk-cg-... \\
        --model bench-paced --concurrency 256 --streams 2

Opens `--concurrency` keep-alive connections (spread over `--ramp` seconds) and runs
streams on each one after another: `--streams` of them, or as many as start within
`--duration` seconds. Prints one JSON object: time to first event and gaps between events
(milliseconds, percentiles), stalls (gaps over `--stall-ms`), errors, and the most streams
seen in flight at once. A raw asyncio protocol with httptools' parser: the client costs a few
microseconds per read, so that it is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

# As an `event:` line or as the data's type: LiteLLM, for one, sends data lines only.
TERMINAL = b"response.completed"


@dataclass
class Plan:
    host: str
    port: int
    request: bytes
    streams: int | None
    until: float | None
    stall_ms: float


@dataclass
class Tally:
    ttfe: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    completed: int = 0
    stalls: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    events: int = 0


class StreamConnection(asyncio.Protocol):
    """One keep-alive connection that runs streams back to back."""

    def __init__(self, plan: Plan, tally: Tally, done: asyncio.Future[None]):
        self._plan = plan
        self._tally = tally
        self._done = done
        self._transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._started = 0
        self._sent_at = 0.0
        self._last = 0.0
        self._events = 0
        self._tail = b""
        self._terminal = False
        self._active = False

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._send()

    def _send(self) -> None:
        plan = self._plan
        if (plan.streams is not None and self._started >= plan.streams) or (
            plan.until is not None and time.perf_counter() >= plan.until
        ):
            self._close()
            return
        self._started += 1
        self._events = 0
        self._tail = b""
        self._terminal = False
        self._active = True
        tally = self._tally
        tally.in_flight += 1
        tally.most_in_flight = max(tally.most_in_flight, tally.in_flight)
        self._sent_at = time.perf_counter()
        self._transport.write(plan.request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP from the server: {exc}")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status != 200:
            self._fail(f"HTTP {status}")

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        seen = self._tail + body
        # The tail carries what a boundary or the terminal event's name split across reads.
        count = seen.count(b"\n\n", len(self._tail) - 1 if self._tail else 0)
        if not self._terminal and TERMINAL in seen:
            self._terminal = True
        self._tail = seen[-len(TERMINAL) :]
        if not count:
            return
        tally = self._tally
        tally.events += count
        if self._events == 0:
            tally.ttfe.append((now - self._sent_at) * 1000)
        else:
            gap = (now - self._last) * 1000
            tally.gaps.append(gap)
            if gap > self._plan.stall_ms:
                tally.stalls += 1
        # Events that came in the same read arrived together: no gap between them.
        tally.gaps.extend([0.0] * (count - 1))
        self._events += count
        self._last = now

    def on_message_complete(self) -> None:
        if not self._active:
            return
        self._active = False
        self._tally.in_flight -= 1
        if not self._terminal:
            self._tally.errors.append("the stream ended without response.completed")
        else:
            self._tally.completed += 1
        if self._parser.should_keep_alive():
            self._send()
        else:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._active:
            self._fail(f"the connection closed mid-stream ({exc or 'EOF'})")
        if not self._done.done():
            self._done.set_result(None)

    def _fail(self, reason: str) -> None:
        if self._active:
            self._active = False
            self._tally.in_flight -= 1
            self._tally.errors.append(reason)
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self._done.done():
            self._done.set_result(None)


async def _connection(plan: Plan, tally: Tally, delay: float) -> None:
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(
            lambda: StreamConnection(plan, tally, done), plan.host, plan.port
        )
    except OSError as exc:
        tally.errors.append(f"connect: {exc}")
        return
    await done


async def run(
    url: str,
    key: str,
    model: str,
    concurrency: int,
    streams: int | None,
    duration: float | None,
    ramp: float,
    stall_ms: float,
    timeout: float,
) -> dict[str, Any]:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "input": "hi", "stream": True}).encode()
    request = (
        f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    started = time.perf_counter()
    until = started + ramp + duration if duration is not None else None
    plan = Plan(parts.hostname or "127.0.0.1", parts.port or 80, request, streams, until, stall_ms)
    tally = Tally()
    tasks = [
        asyncio.ensure_future(_connection(plan, tally, ramp * n / concurrency))
        for n in range(concurrency)
    ]
    _, unfinished = await asyncio.wait(tasks, timeout=timeout)
    for task in unfinished:
        task.cancel()
    if unfinished:
        tally.errors.append(f"{len(unfinished)} connection(s) still busy after {timeout:g} s")
    return summary(tally, time.perf_counter() - started)


def percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def summary(tally: Tally, elapsed: float) -> dict[str, Any]:
    ttfe, gaps = sorted(tally.ttfe), sorted(tally.gaps)
    return {
        "completed": tally.completed,
        "errors": len(tally.errors),
        "first_errors": sorted(set(tally.errors))[:5],
        "stalls": tally.stalls,
        "events": tally.events,
        "most_in_flight": tally.most_in_flight,
        "seconds": round(elapsed, 3),
        "ttfe_ms": {
            "p50": percentile(ttfe, 0.50),
            "p99": percentile(ttfe, 0.99),
            "max": ttfe[-1] if ttfe else None,
            "n": len(ttfe),
        },
        "gap_ms": {
            "p50": percentile(gaps, 0.50),
            "p99": percentile(gaps, 0.99),
            "max": gaps[-1] if gaps else None,
            "n": len(gaps),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="none")
    parser.add_argument("--model", default="bench-paced")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--streams", type=int, default=None, help="streams per connection")
    parser.add_argument("--duration", type=float, default=None, help="start streams this long")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread connections over this")
    parser.add_argument("--stall-ms", type=float, default=200.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if (args.streams is None) == (args.duration is None):
        parser.error("give exactly one of --streams and --duration")
    coroutine = run(
        args.url,
        args.key,
        args.model,
        args.concurrency,
        args.streams,
        args.duration,
        args.ramp,
        args.stall_ms,
        args.timeout,
    )
    try:
        import uvloop
    except ImportError:  # plain asyncio is slower but still correct
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
