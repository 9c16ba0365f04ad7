"""Turn what happened to one request into its usage row, and log the bill in four stages.

The stages (one request id on each line) are what an operator checks a bill with:
raw upstream usage -> mapped token classes -> billed counts with prices -> cost term by term.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from codex_gateway.billing.pricing import Cost, Price, PriceTable, compute_cost, plain
from codex_gateway.relay.usage import (
    FLAG_CACHED_OVER_INPUT,
    FLAG_INVALID,
    FLAG_MISSING,
    FLAG_REASONING_OVER_OUTPUT,
    NO_USAGE,
    MappedUsage,
    map_usage,
    with_estimate,
)

log = logging.getLogger("codex_gateway.billing")

FLAG_MODEL_MISMATCH = "upstream_model_differs"
FLAG_ESTIMATED = "estimated"
FLAG_NEEDS_REVIEW = "needs_review"
# The request cost more than the largest cost held for it when it was admitted.
FLAG_EXCEEDED_HOLD = "exceeded_hold"
FLAG_TRUNCATED = "upstream_field_truncated"
# The gateway's own count raised: the row bills what the upstream reported, and is reviewed.
FLAG_ESTIMATE_FAILED = "estimate_failed"
# The account that served the request was removed before its row was written: the row names
# it in its attempts only.
FLAG_ACCOUNT_REMOVED = "account_removed"
MAX_TEXT = 200
UNBILLABLE_FLAGS = frozenset({FLAG_INVALID, FLAG_MISSING})
# Statuses of an answer the upstream served in full or in part: the work was done.
SERVED_STATUSES = frozenset({"completed", "incomplete"})
PRICE_COLUMNS = ("price_model", "price_input", "price_cached_input", "price_output", "markup")
REVIEW_FLAGS = frozenset(
    {FLAG_INVALID, FLAG_CACHED_OVER_INPUT, FLAG_REASONING_OVER_OUTPUT, FLAG_ESTIMATE_FAILED}
)


@dataclass(slots=True)
class Outcome:
    """Everything the relay learned about one request, filled in as it goes."""

    request_id: str
    started_at: datetime
    started: float
    endpoint: str
    model: str
    stream: bool
    price: Price
    user_id: int | None = None
    key_id: int | None = None
    account_id: int | None = None
    status: str = "completed"
    http_status: int = 200
    error: str | None = None
    usage: Any = None
    usage_reported: bool = False
    upstream_model: str | None = None
    response_id: str | None = None
    flags: list[str] = field(default_factory=list)
    ttfb_ms: float | None = None
    # Milliseconds from arrival until the upstream call began: the gateway's own overhead.
    overhead_ms: float | None = None
    duration_ms: float = 0.0
    client_bytes: int = 0
    hold: Decimal = Decimal(0)
    # What the request holds against its key's cap (0 when the key has none).
    key_hold: Decimal = Decimal(0)
    # The input tokens the holds were made for (`held_input_tokens`).
    held_input_tokens: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # The gateway's own count, billed for what the upstream's usage does not give readably.
    estimate: dict[str, Any] | None = None
    # `usage` and its mapping, kept so that it is mapped once (`reported_usage`).
    _mapped: tuple[Any, MappedUsage] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)

    def reported_usage(self) -> MappedUsage:
        """The upstream's usage, mapped; NO_USAGE when it reported none."""
        if not self.usage_reported:
            return NO_USAGE
        if self._mapped is None or self._mapped[0] is not self.usage:
            self._mapped = (self.usage, map_usage(self.usage))
        return self._mapped[1]

    def billed_usage(self) -> MappedUsage:
        """The counts the request is billed by: the upstream's usage, mapped, with each side
        it does not give readably taken from the gateway's estimate once one is made."""
        reported = self.reported_usage()
        if reported.billable or self.estimate is None:
            return reported
        return map_usage(with_estimate(self.usage, self.estimate))

    def served_without_usage(self) -> bool:
        """Whether the upstream served an answer (completed or incomplete) yet reported no
        usage that can be billed: none, or counts that are not counts. The work was done, so
        such a request is billed the gateway's estimate, for the counts it cannot read,
        rather than nothing."""
        return self.status in SERVED_STATUSES and not self.reported_usage().billable

    def known(self) -> dict[str, Any]:
        """What a hold journal keeps of the request before its usage is known."""
        return {
            "request_id": self.request_id,
            "started_at": self.started_at,
            "user_id": self.user_id,
            "key_id": self.key_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "stream": self.stream,
        }


def cut_by_shutdown(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Whether the running request's task was cancelled, which only a shutdown does to a
    relay (the grace period ran out, or a second SIGTERM): its bill says so. `loop`: the
    running loop, when the caller holds it (asking for it costs a system call)."""
    task = asyncio.current_task(loop)
    return task is not None and task.cancelling() > 0


def bill(outcome: Outcome, prices: PriceTable, trace: bool = False) -> dict[str, Any]:
    """The usage row for `outcome`: raw usage, mapped counts, price snapshot and each term.

    The four stages are logged at DEBUG, or at INFO when `trace` is on for this request.
    """
    flags = list(outcome.flags)
    reported = outcome.reported_usage()
    mapped = outcome.billed_usage()
    if mapped is not reported:  # the estimate stands in for what the upstream's does not give
        if outcome.usage_reported or outcome.status in SERVED_STATUSES:
            # Why the upstream's own count was not billed: usage_invalid or usage_missing.
            flags.extend(flag for flag in reported.flags if flag not in flags)
        flags.append(FLAG_ESTIMATED)
    another_model = _ran_another_model(outcome, prices)
    price = _price_for(outcome, prices, another_model)
    cost = compute_cost(mapped, price)
    flags.extend(flag for flag in mapped.flags if flag not in flags)
    if any(flag in REVIEW_FLAGS for flag in flags):
        flags.append(FLAG_NEEDS_REVIEW)
    if another_model:
        flags.append(FLAG_MODEL_MISMATCH)
    if outcome.hold > 0 and cost.total > outcome.hold:
        flags.append(FLAG_EXCEEDED_HOLD)
    upstream_model = _clip(outcome.upstream_model, flags)
    response_id = _clip(outcome.response_id, flags)
    level = logging.INFO if trace else logging.DEBUG
    if log.isEnabledFor(level):
        _log_stages(outcome, mapped, price, cost, level)
    return {
        "request_id": outcome.request_id,
        "started_at": outcome.started_at,
        "user_id": outcome.user_id,
        "key_id": outcome.key_id,
        "account_id": outcome.account_id,
        "endpoint": outcome.endpoint,
        "model": outcome.model,
        "upstream_model": upstream_model,
        "stream": outcome.stream,
        "status": outcome.status,
        "http_status": outcome.http_status,
        "error": outcome.error,
        "response_id": response_id,
        "raw_usage": orjson.dumps(outcome.usage).decode() if outcome.usage_reported else None,
        "input_tokens": mapped.input_tokens,
        "cached_tokens": mapped.cached_tokens,
        "uncached_input_tokens": mapped.uncached_input_tokens,
        "output_tokens": mapped.output_tokens,
        "reasoning_tokens": mapped.reasoning_tokens,
        "price_model": price.model,
        "price_input": price.input,
        "price_cached_input": price.cached_input,
        "price_output": price.output,
        "markup": price.markup,
        "cost_uncached_input": cost.uncached_input,
        "cost_cached_input": cost.cached_input,
        "cost_output": cost.output,
        "cost_before_markup": cost.before_markup,
        "cost_usd": cost.total,
        "flags": orjson.dumps(flags).decode(),
        "duration_ms": outcome.duration_ms,
        "ttfb_ms": outcome.ttfb_ms,
        "client_bytes": outcome.client_bytes,
        "attempts": orjson.dumps(outcome.attempts).decode() if outcome.attempts else None,
    }


def billed_price(outcome: Outcome, prices: PriceTable) -> Price:
    """The price `bill` prices `outcome` at."""
    return _price_for(outcome, prices, _ran_another_model(outcome, prices))


def _price_for(outcome: Outcome, prices: PriceTable, another_model: bool) -> Price:
    """Price by the model the upstream says it ran when that is priced; else as admitted."""
    if outcome.upstream_model and another_model:
        reported = prices.resolve(outcome.upstream_model)
        if reported is not None:
            return reported
    return outcome.price


def _ran_another_model(outcome: Outcome, prices: PriceTable) -> bool:
    reported = outcome.upstream_model
    return bool(reported) and prices.base(str(reported)) != prices.base(outcome.model)


def _clip(value: str | None, flags: list[str]) -> str | None:
    """Upstream text bound for a column of MAX_TEXT characters; longer text is cut and flagged."""
    if value is None or len(value) <= MAX_TEXT:
        return value
    if FLAG_TRUNCATED not in flags:
        flags.append(FLAG_TRUNCATED)
    return value[:MAX_TEXT]


def _log_stages(
    outcome: Outcome, mapped: MappedUsage, price: Price, cost: Cost, level: int
) -> None:
    extra = {"request_id": outcome.request_id}
    raw = orjson.dumps(outcome.usage).decode() if outcome.usage_reported else "none reported"
    if outcome.estimate is not None:
        raw += " estimated=" + orjson.dumps(outcome.estimate).decode()
    log.log(
        level,
        "stage=raw status=%s upstream_model=%s usage=%s",
        outcome.status,
        outcome.upstream_model,
        raw,
        extra=extra,
    )
    log.log(
        level,
        "stage=mapped input=%d cached=%d uncached=%d output=%d reasoning=%d flags=%s",
        mapped.input_tokens,
        mapped.cached_tokens,
        mapped.uncached_input_tokens,
        mapped.output_tokens,
        mapped.reasoning_tokens,
        ",".join(mapped.flags) or "-",
        extra=extra,
    )
    log.log(
        level,
        "stage=billed model=%s price_model=%s uncached=%d cached=%d output=%d "
        "usd_per_1m input=%s cached_input=%s output=%s markup=%s",
        outcome.model,
        price.model,
        mapped.uncached_input_tokens,
        mapped.billable_cached_tokens,
        mapped.output_tokens,
        plain(price.input),
        plain(price.cached_input),
        plain(price.output),
        plain(price.markup),
        extra=extra,
    )
    log.log(
        level,
        "stage=cost uncached=%s cached=%s output=%s before_markup=%s total=$%s",
        plain(cost.uncached_input),
        plain(cost.cached_input),
        plain(cost.output),
        plain(cost.before_markup),
        plain(cost.total),
        extra=extra,
    )


def explain(row: dict[str, Any]) -> str:
    """One request's bill, term by term, with the formula and its numbers."""
    lines = [
        f"request   {row['request_id']}",
        f"started   {row['started_at']:%Y-%m-%d %H:%M:%S} UTC"
        f"   duration {row['duration_ms']:.1f} ms"
        + (f"   first byte {row['ttfb_ms']:.1f} ms" if row.get("ttfb_ms") is not None else ""),
        f"user      {row.get('user') or '-'}   key {row.get('key') or '-'}   "
        f"account {row.get('account') or '-'}",
        f"model     {row['model']} (upstream reported {row.get('upstream_model') or '-'})   "
        f"endpoint {row['endpoint']}   stream {'yes' if row['stream'] else 'no'}",
        f"status    {row['status']} (HTTP {row['http_status']})"
        f"   client bytes {row['client_bytes']}"
        + (f"   error: {row['error']}" if row.get("error") else ""),
        f"flags     {', '.join(orjson.loads(row['flags'])) or 'none'}",
        *_attempt_lines(row.get("attempts")),
        "",
        "1. raw upstream usage",
        f"   {row['raw_usage'] or 'none reported'}",
        *(
            [
                "   counts below that this usage does not give are the gateway's estimate"
                " (o200k_base tokens of the request and of the output it was sent)"
            ]
            if FLAG_ESTIMATED in orjson.loads(row["flags"])
            else []
        ),
        "",
        "2. mapped (cached is part of input, reasoning is part of output)",
        f"   input {row['input_tokens']} = uncached {row['uncached_input_tokens']}"
        f" + cached {row['input_tokens'] - row['uncached_input_tokens']}"
        f"   (cached reported: {row['cached_tokens']})",
        f"   output {row['output_tokens']} (of which reasoning {row['reasoning_tokens']})",
        "",
        *_price_lines(row),
        "",
        "4. cost",
    ]
    lines.extend(_cost_lines(row))
    return "\n".join(lines)


def _priced(row: dict[str, Any]) -> bool:
    """Whether the row keeps a price snapshot (a request released as interrupted has none)."""
    return all(row.get(name) is not None for name in PRICE_COLUMNS)


def _price_lines(row: dict[str, Any]) -> list[str]:
    if not _priced(row):
        return ["3. prices: none recorded (the request was never priced)"]
    return [
        f"3. prices for {row['price_model']} (USD per 1M tokens)",
        f"   input {plain(row['price_input'])}   cached input {plain(row['price_cached_input'])}"
        f"   output {plain(row['price_output'])}   markup x{plain(row['markup'])}",
    ]


def _attempt_lines(attempts: str | None) -> list[str]:
    if not attempts:
        return []
    lines = ["attempts"]
    for number, attempt in enumerate(orjson.loads(attempts), 1):
        error = f" ({attempt['error']})" if attempt.get("error") else ""
        lines.append(
            f"   {number}. {attempt['account']}: {attempt['outcome']}{error} {attempt['ms']} ms"
        )
    return lines


def _cost_lines(row: dict[str, Any]) -> list[str]:
    flags = orjson.loads(row["flags"])
    unusable = [flag for flag in flags if flag in UNBILLABLE_FLAGS and FLAG_ESTIMATED not in flags]
    if unusable or not _priced(row):
        reason = (
            f"{', '.join(unusable)} (the upstream reported no usable usage)"
            if unusable
            else f"{row['status']} (no prices recorded)"
        )
        return [f"   not billed: {reason}", "", f"   total charged: ${plain(row['cost_usd'])}"]
    cached_billed = row["input_tokens"] - row["uncached_input_tokens"]
    terms = [
        (
            "uncached input",
            row["uncached_input_tokens"],
            row["price_input"],
            row["cost_uncached_input"],
        ),
        ("cached input", cached_billed, row["price_cached_input"], row["cost_cached_input"]),
        ("output", row["output_tokens"], row["price_output"], row["cost_output"]),
    ]
    width = max(len(name) for name, *_ in terms)
    lines = [
        f"   {name:<{width}}  {tokens:>9} x {plain(price)} / 1,000,000 = {plain(cost)}"
        for name, tokens, price, cost in terms
    ]
    markup: Decimal = row["markup"]
    lines += [
        f"   {'sum':<{width}}  {plain(row['cost_before_markup'])}",
        f"   {'x markup':<{width}}  {plain(row['cost_before_markup'])} x {plain(markup)}"
        f" = {plain(row['cost_usd'])}",
        "",
        f"   total charged: ${plain(row['cost_usd'])}",
        "   formula: ((input - cached) x P_in + cached x P_cached + output x P_out) / 1e6 x markup",
    ]
    return lines
