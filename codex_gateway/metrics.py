"""Prometheus metrics for one gateway process, recorded at the edges of a request.

Each process has its own registry (on the `Gateway` object) and serves its own numbers at
`/metrics`; with several processes Prometheus scrapes each one and sums them. Nothing is
recorded per streamed chunk: one access-line update per request and one update per
settlement. Those per-request series are plain numbers the event loop adds to, turned into
Prometheus samples only when scraped: a labelled client metric takes a lock and makes several
calls for every update, which a request pays for and a scrape need not.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "unknown"
UNMATCHED_ROUTE = "unmatched"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
TOKEN_CLASSES = (
    ("uncached_input", "uncached_input_tokens"),
    ("cached_input", "cached_tokens"),
    ("output", "output_tokens"),
    ("reasoning", "reasoning_tokens"),
)
# Upstream rate-limit windows announced in response headers (see the protocol reference).
QUOTA_WINDOWS = ("primary", "secondary")


class Tally:
    """A counter by label values, kept as plain numbers and read when scraped."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        yield family


class Timings:
    """A histogram by label values, kept as plain bucket counts and read when scraped."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = buckets
        self._les = [str(float(bound)) for bound in buckets] + ["+Inf"]
        # Per label values: one count per bucket (the last is above every bound), then the sum.
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not labels:  # an unlabelled histogram is shown, at zero, from the start
            self.series[()] = [0.0] * (len(buckets) + 2)

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, series in self.series.items():
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, series, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(labels, buckets, series[-1])
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Tally(
            "codex_gateway_requests",
            "HTTP requests by route, status and model.",
            ("route", "status", "model"),
        )
        self.latency = Timings(
            "codex_gateway_request_seconds",
            "Time from the request's arrival to its last byte (the bill is written after).",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.ttfb = Timings(
            "codex_gateway_upstream_first_byte_seconds",
            "Time from the request's arrival to the upstream's response headers.",
            ("model",),
            LATENCY_BUCKETS,
        )
        self.overhead = Timings(
            "codex_gateway_overhead_seconds",
            "The gateway's own time before the upstream call: authentication, admission (and any "
            "wait for the usage writer), shaping.",
            (),
            OVERHEAD_BUCKETS,
        )
        self.tokens = Tally(
            "codex_gateway_tokens",
            "Billed tokens by model and class (cached is part of input, reasoning of output).",
            ("model", "token_class"),
        )
        self.cost = Tally(
            "codex_gateway_cost_usd",
            "USD charged, by model (a float view; the ledger holds the exact amounts).",
            ("model",),
        )
        collectors: tuple[Tally | Timings, ...] = (
            self.requests, self.latency, self.ttfb, self.overhead, self.tokens, self.cost
        )  # fmt: skip
        for collector in collectors:
            r.register(collector)
        self.spooled = Counter(
            "codex_gateway_spooled_rows",
            "Usage rows written to the local spool because the database could not take them.",
            registry=r,
        )
        self.writer_waits = Counter(
            "codex_gateway_writer_waits",
            "Requests that waited for the usage writer to catch up before they were relayed.",
            registry=r,
        )
        self.writer_paces = Counter(
            "codex_gateway_writer_paces",
            "Requests that waited a millisecond to give a usage writer at low priority time.",
            registry=r,
        )
        self.recovered_holds = Counter(
            "codex_gateway_recovered_holds",
            "Holds of dead gateway processes found in their journals: settled from the "
            "journaled usage, or released with an interrupted usage row.",
            ["outcome"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "codex_gateway_upstream_errors",
            "Upstream failures by account and kind.",
            ["account", "kind"],
            registry=r,
        )
        self.quota_used = Gauge(
            "codex_gateway_account_quota_used_percent",
            "The share of an upstream account's rate-limit window used, as the upstream last "
            "reported it.",
            ["account", "window"],
            registry=r,
        )
        self.quota_window = Gauge(
            "codex_gateway_account_quota_window_minutes",
            "The length of an upstream account's rate-limit window.",
            ["account", "window"],
            registry=r,
        )
        self.in_flight = Gauge(
            "codex_gateway_streams_in_flight",
            "Relay requests being served right now.",
            registry=r,
        )
        self.holds = Gauge(
            "codex_gateway_open_holds",
            "Requests holding part of a balance: relays in flight and rows queued for writing.",
            registry=r,
        )

    def track(self, in_flight: Callable[[], int], holds: Callable[[], int]) -> None:
        """Read both gauges from the gateway's own counters when scraped."""
        self.in_flight.set_function(lambda: float(in_flight()))
        self.holds.set_function(lambda: float(holds()))

    def recovered(self, settled: int, released: int) -> None:
        self.recovered_holds.labels("settled").inc(settled)
        self.recovered_holds.labels("released").inc(released)

    def request_done(self, route: str, status: int, model: str, seconds: float) -> None:
        self.requests.add((route, str(status), model))
        self.latency.observe((route,), seconds)

    def settled(
        self, row: Mapping[str, Any], account: str | None, overhead_ms: float | None
    ) -> None:
        """Tokens, cost, timings and upstream errors of one settled request."""
        model = str(row["price_model"])
        for token_class, column in TOKEN_CLASSES:
            count = row[column]
            if isinstance(count, int) and count > 0:
                self.tokens.add((model, token_class), count)
        self.cost.add((model,), float(row["cost_usd"]))
        if row["ttfb_ms"] is not None:
            self.ttfb.observe((model,), row["ttfb_ms"] / 1000)
        if overhead_ms is not None:
            self.overhead.observe((), overhead_ms / 1000)
        if "stream_interrupted" in row["flags"]:
            # Failures before the first byte are counted per attempt by upstream_failed.
            self.upstream_errors.labels(account or "-", _error_kind(row["flags"])).inc()

    def upstream_failed(self, account: str, kind: str) -> None:
        self.upstream_errors.labels(account, kind).inc()

    def upstream_answered(self, account: str, headers: Mapping[str, str]) -> None:
        """Record the rate-limit windows an upstream announces in its response headers."""
        for window in QUOTA_WINDOWS:
            used = _number(headers.get(f"x-codex-{window}-used-percent"))
            if used is None:
                continue
            self.quota_used.labels(account, window).set(used)
            minutes = _number(headers.get(f"x-codex-{window}-window-minutes"))
            if minutes is not None:
                self.quota_window.labels(account, window).set(minutes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _error_kind(flags: str) -> str:
    """The kind of a failure after the first byte: the flag set just before
    `stream_interrupted` (`cut`, `timeout_idle`, ...)."""
    names = orjson.loads(flags)
    position = names.index("stream_interrupted")
    return str(names[position - 1]) if position > 0 else "upstream_error"
