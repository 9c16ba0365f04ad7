"""Compare our usage records with another system's, and name the classic mistakes.

Records are matched by request id or upstream response id. For each pair that disagrees the
diagnosis says which well-known error explains it: input and output swapped, cached tokens
counted on top of input, reasoning tokens counted on top of output, or the same tokens priced
from a different table. It also refuses to call a file clean that cannot be trusted as a
whole: a request listed twice, a value that is not a number (reported by line), or days whose
counts or totals disagree. No I/O here: the command line feeds rows in and prints the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from codex_gateway.billing.pricing import MILLION, MONEY, ZERO, plain

FIELDS = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "cost_usd")
ID_FIELDS = ("request_id", "response_id")
RATE_FIELDS = ("price_input", "price_cached_input", "price_output", "markup")

# Names other exports use for our fields; an operator can add more with --map.
ALIASES: dict[str, str] = {
    "id": "request_id",
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "cached_input_tokens": "cached_tokens",
    "cache_read_tokens": "cached_tokens",
    "reasoning_output_tokens": "reasoning_tokens",
    "cost": "cost_usd",
    "usd": "cost_usd",
    "created_at": "started_at",
    "date": "started_at",
    "timestamp": "started_at",
}

SWAPPED = "input and output swapped"
CACHED_TWICE = "cached tokens counted twice (added on top of input)"
REASONING_ADDED = "reasoning tokens added on top of output"
OTHER_PRICES = "same tokens, different cost: another price table or markup"

_COUNT = re.compile(r"[0-9]+")
_AMOUNT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class Record:
    ids: tuple[str | None, str | None]
    day: str
    counts: tuple[int | None, int | None, int | None, int | None]
    cost: Decimal | None
    # USD per token for input, cached input and output, markup included (our records only).
    rates: tuple[Decimal, Decimal, Decimal] | None = None
    # Where the row was in its file, and the values in it that could not be read.
    line: int | None = None
    unreadable: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.ids[0] or self.ids[1] or "(no id)"


@dataclass
class Mismatch:
    key: str
    ours: Record
    theirs: Record
    fields: list[str]
    diagnosis: list[str]


@dataclass
class Report:
    matched: int = 0
    mismatched: list[Mismatch] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    days: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    day_mismatches: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.mismatched
            or self.missing
            or self.extra
            or self.duplicates
            or self.unreadable
            or self.day_mismatches
        )

    def mistakes(self) -> dict[str, int]:
        counted: dict[str, int] = {}
        for mismatch in self.mismatched:
            for name in mismatch.diagnosis:
                counted[name] = counted.get(name, 0) + 1
        return counted


def normalise(
    row: Mapping[str, Any], mapping: Mapping[str, str] | None = None, line: int | None = None
) -> Record:
    """A row from any export, under our field names (aliases and `mapping` applied).

    A count or cost that is present but not a plain number (empty, "abc", "1e3", "free") is
    named in `unreadable`; a column the export does not have at all is simply not compared.
    """
    names = {**ALIASES, **(mapping or {})}
    fields: dict[str, Any] = {}
    for name, value in row.items():
        fields.setdefault(names.get(name, name), value)
    counts = tuple(_int(fields.get(name)) for name in FIELDS[:4])
    cost = _decimal(fields.get("cost_usd"))
    read = (*counts, cost)
    unreadable = tuple(
        f"{name}={fields[name]!r}"
        for name, value in zip(FIELDS, read, strict=True)
        if name in fields and value is None
    )
    return Record(
        ids=(_text(fields.get("request_id")), _text(fields.get("response_id"))),
        day=str(fields.get("started_at") or "")[:10],
        counts=(counts[0], counts[1], counts[2], counts[3]),
        cost=cost,
        rates=_rates(fields),
        line=line,
        unreadable=unreadable,
    )


def _rates(fields: Mapping[str, Any]) -> tuple[Decimal, Decimal, Decimal] | None:
    """USD per token, markup included, from our rows' price snapshot."""
    values = [_decimal(fields.get(name)) for name in RATE_FIELDS]
    prices = [value for value in values if value is not None]
    if len(prices) != len(RATE_FIELDS):
        return None
    p_in, p_cached, p_out, markup = prices
    return tuple(  # type: ignore[return-value]
        MONEY.divide(MONEY.multiply(price, markup), MILLION) for price in (p_in, p_cached, p_out)
    )


def reconcile(ours: Iterable[Record], theirs: Iterable[Record]) -> Report:
    report = Report()
    by_id: dict[str, Record] = {}
    for record in ours:
        _count_day(report, record, "ours")
        for identifier in record.ids:
            if identifier:
                by_id[identifier] = record
    seen: set[int] = set()
    their_ids: dict[str, int | None] = {}
    dated = True
    for record in theirs:
        dated = dated and bool(record.day)
        _count_day(report, record, "theirs")
        _check_readable(report, record, their_ids)
        key = next((i for i in record.ids if i and i in by_id), None)
        if key is None:
            report.extra.append(record.name)
            continue
        mine = by_id[key]
        if id(mine) in seen:
            continue
        seen.add(id(mine))
        _compare(report, key, mine, record)
    unmatched = {id(r): r for r in by_id.values() if id(r) not in seen}
    report.missing = [r.name for r in unmatched.values()]
    if dated:
        report.day_mismatches = _day_mismatches(report.days)
    return report


def _check_readable(report: Report, record: Record, seen: dict[str, int | None]) -> None:
    """Note a request their file lists twice, and values in it that are not numbers."""
    where = f"line {record.line}" if record.line is not None else "a row"
    if record.unreadable:
        report.unreadable.append(f"{where} ({record.name}): {', '.join(record.unreadable)}")
    identifier = record.ids[0] or record.ids[1]
    if identifier is None:
        return
    if identifier in seen:
        first = seen[identifier]
        earlier = f" (first at line {first})" if first is not None else ""
        report.duplicates.append(f"{identifier} at {where}{earlier}")
        return
    seen[identifier] = record.line


def _day_mismatches(days: dict[str, dict[str, Any]]) -> list[str]:
    """Days whose row counts or cost totals differ between the two sides."""
    return [
        f"{day}: {totals['ours']} rows ${plain(totals['ours_cost'])} ours, "
        f"{totals['theirs']} rows ${plain(totals['theirs_cost'])} theirs"
        for day, totals in sorted(days.items())
        if totals["ours"] != totals["theirs"] or totals["ours_cost"] != totals["theirs_cost"]
    ]


def _compare(report: Report, key: str, ours: Record, theirs: Record) -> None:
    names = [
        name
        for name, a, b in zip(
            FIELDS, (*ours.counts, ours.cost), (*theirs.counts, theirs.cost), strict=True
        )
        if b is not None and a != b
    ]
    if not names:
        report.matched += 1
        return
    report.mismatched.append(Mismatch(key, ours, theirs, names, diagnose(ours, theirs)))


def diagnose(ours: Record, theirs: Record) -> list[str]:
    """Which classic mistakes explain the difference (possibly several, possibly none)."""
    found: list[str] = []
    (inp, cached, out, reasoning), (t_inp, _, t_out, _) = ours.counts, theirs.counts
    if t_inp is not None and t_out is not None and (t_inp, t_out) == (out, inp) and inp != out:
        found.append(SWAPPED)
    if t_inp is not None and inp is not None and cached and t_inp == inp + cached:
        found.append(CACHED_TWICE)
    if t_out is not None and out is not None and reasoning and t_out == out + reasoning:
        found.append(REASONING_ADDED)
    same_tokens = all(b is None or a == b for a, b in zip(ours.counts, theirs.counts, strict=True))
    if same_tokens and theirs.cost is not None and theirs.cost != ours.cost:
        found.append(_cost_mistake(ours, theirs.cost))
    return found


def _cost_mistake(ours: Record, their_cost: Decimal) -> str:
    """Same tokens, another cost: the extra may be a token class billed twice."""
    if ours.rates is not None and ours.cost is not None:
        rate_in, _, rate_out = ours.rates
        _, cached, _, reasoning = ours.counts
        extra = MONEY.subtract(their_cost, ours.cost)
        if cached and extra == MONEY.multiply(Decimal(cached), rate_in):
            return CACHED_TWICE
        if reasoning and extra == MONEY.multiply(Decimal(reasoning), rate_out):
            return REASONING_ADDED
    return OTHER_PRICES


def _count_day(report: Report, record: Record, side: str) -> None:
    day = report.days.setdefault(
        record.day or "unknown",
        {"ours": 0, "theirs": 0, "ours_cost": ZERO, "theirs_cost": ZERO},
    )
    day[side] += 1
    if record.cost is not None:
        day[f"{side}_cost"] = MONEY.add(day[f"{side}_cost"], record.cost)


def _int(value: Any) -> int | None:
    """A count written as plain digits (or a JSON integer), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    text = str(value).strip() if value is not None else ""
    return int(text) if _COUNT.fullmatch(text) else None


def _decimal(value: Any) -> Decimal | None:
    """An amount written as a plain decimal (or a JSON number, or ours), else None."""
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, float):
        number = Decimal(repr(value))
        return number if number.is_finite() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    text = str(value).strip() if value is not None else ""
    if not _AMOUNT.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
