"""Metrics recorded from one settled row and one set of upstream headers."""

from __future__ import annotations

import pytest

from codex_gateway.metrics import Metrics
from tests.billing.test_spool import usage_row


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_settled_row_adds_its_tokens_cost_and_first_byte_time() -> None:
    metrics = Metrics()
    row = usage_row("req_a") | {"ttfb_ms": 250.0}

    metrics.settled(row, "main", overhead_ms=0.4)
    metrics.settled(row, "main", overhead_ms=0.4)

    model = {"model": "gpt-5.1-codex"}
    assert (
        value(metrics, "codex_gateway_tokens_total", **model, token_class="cached_input")
        == 2 * 11465
    )
    assert (
        value(metrics, "codex_gateway_tokens_total", **model, token_class="uncached_input")
        == 2 * 306
    )
    assert value(metrics, "codex_gateway_tokens_total", **model, token_class="output") == 2 * 306
    assert value(metrics, "codex_gateway_tokens_total", **model, token_class="reasoning") == 2 * 192
    assert value(metrics, "codex_gateway_cost_usd_total", **model) == pytest.approx(2 * 0.004875625)
    assert value(metrics, "codex_gateway_upstream_first_byte_seconds_sum", **model) == 0.5
    assert value(metrics, "codex_gateway_overhead_seconds_count") == 2
    assert (
        value(
            metrics, "codex_gateway_upstream_errors_total", account="main", kind="upstream_timeout"
        )
        is None
    )


@pytest.mark.parametrize(
    ("flags", "kind"),
    [
        # a failure after the first byte: the kind recorded just before the interruption
        ('["cut","stream_interrupted"]', "cut"),
        ('["messages_converted","timeout_idle","stream_interrupted"]', "timeout_idle"),
    ],
)
def test_failures_after_the_first_byte_count_when_settled(flags: str, kind: str) -> None:
    metrics = Metrics()
    row = usage_row("req_a") | {"status": "upstream_error", "flags": flags}

    metrics.settled(row, "main", overhead_ms=None)

    assert value(metrics, "codex_gateway_upstream_errors_total", account="main", kind=kind) == 1


def test_failures_before_the_first_byte_count_per_attempt_not_again_when_settled() -> None:
    metrics = Metrics()
    metrics.upstream_failed("main", "http_429")
    metrics.upstream_failed("spare", "connect")
    row = usage_row("req_a") | {"status": "upstream_error", "flags": '["http_429"]'}

    metrics.settled(row, "main", overhead_ms=None)

    assert (
        value(metrics, "codex_gateway_upstream_errors_total", account="main", kind="http_429") == 1
    )
    assert (
        value(metrics, "codex_gateway_upstream_errors_total", account="spare", kind="connect") == 1
    )


def test_quota_windows_come_from_the_upstream_headers() -> None:
    metrics = Metrics()

    metrics.upstream_answered(
        "chatgpt-1",
        {
            "x-codex-primary-used-percent": "12.5",
            "x-codex-primary-window-minutes": "300",
            "x-codex-secondary-used-percent": "not a number",
        },
    )

    assert (
        value(
            metrics,
            "codex_gateway_account_quota_used_percent",
            account="chatgpt-1",
            window="primary",
        )
        == 12.5
    )
    assert (
        value(
            metrics,
            "codex_gateway_account_quota_window_minutes",
            account="chatgpt-1",
            window="primary",
        )
        == 300
    )
    assert (
        value(
            metrics,
            "codex_gateway_account_quota_used_percent",
            account="chatgpt-1",
            window="secondary",
        )
        is None
    )


def test_in_flight_and_holds_are_read_when_scraped() -> None:
    metrics = Metrics()
    counts = {"in_flight": 0, "holds": 0}
    metrics.track(lambda: counts["in_flight"], lambda: counts["holds"])

    counts.update(in_flight=3, holds=1)

    assert value(metrics, "codex_gateway_streams_in_flight") == 3
    assert value(metrics, "codex_gateway_open_holds") == 1
    assert b"codex_gateway_streams_in_flight 3.0" in metrics.render()


def test_request_timings_fall_in_prometheus_buckets_on_scrape() -> None:
    """A time equal to a bound counts in that bound's bucket; one above every bound only in
    +Inf; buckets are cumulative, as Prometheus reads them."""
    metrics = Metrics()
    for seconds in (0.005, 0.0051, 400.0):
        metrics.request_done("/v1/responses", 200, "gpt-5.1-codex", seconds)

    route = {"route": "/v1/responses"}
    assert value(metrics, "codex_gateway_request_seconds_bucket", **route, le="0.005") == 1
    assert value(metrics, "codex_gateway_request_seconds_bucket", **route, le="0.01") == 2
    assert value(metrics, "codex_gateway_request_seconds_bucket", **route, le="300.0") == 2
    assert value(metrics, "codex_gateway_request_seconds_bucket", **route, le="+Inf") == 3
    assert value(metrics, "codex_gateway_request_seconds_count", **route) == 3
    assert value(metrics, "codex_gateway_request_seconds_sum", **route) == pytest.approx(400.0101)
    requests = {"route": "/v1/responses", "status": "200", "model": "gpt-5.1-codex"}
    assert value(metrics, "codex_gateway_requests_total", **requests) == 3
    assert b'codex_gateway_request_seconds_bucket{le="+Inf",route="/v1/responses"} 3.0' in (
        metrics.render()
    )


def test_the_unlabelled_overhead_histogram_is_shown_at_zero_before_any_request() -> None:
    metrics = Metrics()

    assert value(metrics, "codex_gateway_overhead_seconds_count") == 0
    assert value(metrics, "codex_gateway_overhead_seconds_bucket", le="+Inf") == 0
