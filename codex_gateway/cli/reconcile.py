"""`usage export` and `reconcile`: our records out, another system's records compared in."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import click
import orjson

from codex_gateway.billing.pricing import plain
from codex_gateway.billing.reconcile import (
    ALIASES,
    ID_FIELDS,
    Record,
    Report,
    normalise,
    reconcile,
)
from codex_gateway.cli.admin import usage
from codex_gateway.cli.context import with_store
from codex_gateway.store.queries import Store

EXPORT_COLUMNS = [
    "request_id",
    "response_id",
    "started_at",
    "user",
    "key",
    "account",
    "endpoint",
    "model",
    "upstream_model",
    "status",
    "input_tokens",
    "cached_tokens",
    "uncached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "price_input",
    "price_cached_input",
    "price_output",
    "markup",
    "cost_usd",
    "flags",
]
PROGRESS_EVERY = 100_000


def _day(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"must be a date such as 2026-12-01, not {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "is_finite"):
        return plain(value)
    return str(value)


@usage.command("export")
@click.option("--from", "start", callback=_day, help="First day (or moment) included, UTC.")
@click.option("--to", "end", callback=_day, help="First day (or moment) not included, UTC.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def usage_export(
    start: datetime | None, end: datetime | None, fmt: str, output: Path | None
) -> None:
    """Write usage rows as CSV or JSON lines, oldest first (readable by `reconcile`)."""
    _check_span(start, end)

    async def export(store: Store) -> int:
        with _open(output) as sink:
            writer = csv.writer(sink) if fmt == "csv" else None
            if writer is not None:
                writer.writerow(EXPORT_COLUMNS)
            count = 0
            async for row in store.stream_usage(start, end):
                cells = [_cell(row.get(column)) for column in EXPORT_COLUMNS]
                if writer is not None:
                    writer.writerow(cells)
                else:
                    line = dict(zip(EXPORT_COLUMNS, cells, strict=True))
                    sink.write(orjson.dumps(line).decode() + "\n")
                count += 1
            return count

    count = with_store(export)
    if output is not None:
        click.echo(f"wrote {count} usage rows to {output}")


def _check_span(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and start >= end:
        raise click.BadParameter(
            f"--from ({start:%Y-%m-%d %H:%M}) must come before --to ({end:%Y-%m-%d %H:%M})"
        )


def _open(output: Path | None) -> IO[str]:
    if output is None:
        return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
    return output.open("w", encoding="utf-8", newline="")


def read_rows(
    path: Path, fmt: str | None, mapping: Mapping[str, str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV or JSON-lines file with the line each starts on, with progress on stderr
    for large files. A JSON line that does not parse is an empty row, so it is reported; a
    file that cannot be read as a whole (not UTF-8, a CSV line that does not parse, a CSV
    with no id column) stops the command with one line saying where."""
    kind = fmt or ("jsonl" if path.suffix in (".jsonl", ".json", ".ndjson") else "csv")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = _csv_rows(handle, path, mapping) if kind == "csv" else _json_rows(handle)
        try:
            for count, row in enumerate(rows, 1):
                if count % PROGRESS_EVERY == 0:
                    click.echo(f"read {count:,} rows of {path.name}…", err=True)
                yield row
        except UnicodeDecodeError:
            raise click.ClickException(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    """Where the first byte of `path` that is not UTF-8 is. UTF-8 never uses a newline byte
    inside a character, so each line can be decoded alone."""
    offset = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                where = f"line {number} (byte offset {offset + error.start})"
                return f"{path}: {where} is not UTF-8; the file must be UTF-8"
            offset += len(line)
    return f"{path} is not UTF-8; the file must be UTF-8"


def _csv_rows(
    handle: IO[str], path: Path, mapping: Mapping[str, str] | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(handle)
    line = 1
    try:
        _check_columns(path, reader.fieldnames, mapping)  # reads the header
        line = reader.line_num + 1
        for row in reader:
            yield line, row
            line = reader.line_num + 1
    except csv.Error as error:
        raise click.ClickException(f"{path}: line {line}: {_csv_problem(error)}") from None


def _check_columns(
    path: Path, columns: Sequence[str] | None, mapping: Mapping[str, str] | None
) -> None:
    """Refuse a CSV whose rows could match none of ours: one with neither id column."""
    if columns is None:
        return
    names = {**ALIASES, **(mapping or {})}
    if any(names.get(column, column) in ID_FIELDS for column in columns):
        return
    found = ", ".join(repr(column) for column in columns) or "none"
    raise click.ClickException(
        f"{path} has no request_id column (nor response_id) to match rows by; "
        f"its columns are {found} (--map THEIRS=request_id names one)"
    )


def _csv_problem(error: csv.Error) -> str:
    if "field larger than field limit" in str(error):
        return f"a field is longer than {csv.field_size_limit():,} characters"
    return str(error)


def _json_rows(handle: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = {"cost_usd": line.strip()[:40]}
        yield number, row if isinstance(row, dict) else {"cost_usd": str(row)[:40]}


@click.command("reconcile")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None)
@click.option(
    "--map",
    "mappings",
    multiple=True,
    metavar="THEIRS=OURS",
    help="Read their column THEIRS as our field OURS (request_id, response_id, input_tokens, "
    "cached_tokens, output_tokens, reasoning_tokens, cost_usd, started_at). Repeatable.",
)
@click.option("--from", "start", callback=_day, help="Compare our rows from this day (UTC).")
@click.option("--to", "end", callback=_day, help="Compare our rows before this day (UTC).")
@click.option("--show", type=int, default=20, show_default=True, help="Rows listed per kind.")
def reconcile_command(
    file: Path,
    fmt: str | None,
    mappings: tuple[str, ...],
    start: datetime | None,
    end: datetime | None,
    show: int,
) -> None:
    """Compare another system's usage export with ours; exit 1 on any difference.

    Our rows are those in the days the file covers, unless --from/--to say otherwise.
    """
    _check_span(start, end)
    mapping = dict(_pair(item) for item in mappings)
    theirs = [normalise(row, mapping, line) for line, row in read_rows(file, fmt, mapping)]
    days = sorted({record.day for record in theirs if record.day})
    if start is None and days:
        start = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
    if end is None and days:
        end = datetime.fromisoformat(days[-1]).replace(tzinfo=UTC) + timedelta(days=1)

    async def ours(store: Store) -> list[Record]:
        return [normalise(row) async for row in store.stream_usage(start, end)]

    report = reconcile(with_store(ours), theirs)
    click.echo(render(report, show))
    if not report.clean:
        sys.exit(1)


def _pair(item: str) -> tuple[str, str]:
    theirs, sep, ours = item.partition("=")
    if not sep or not theirs or not ours:
        raise click.BadParameter(f"must be THEIRS=OURS, not {item!r}", param_hint="--map")
    return theirs.strip(), ours.strip()


def render(report: Report, show: int) -> str:
    lines = [
        f"matched {report.matched}, mismatched {len(report.mismatched)}, "
        f"missing from theirs {len(report.missing)}, extra in theirs {len(report.extra)}, "
        f"listed twice {len(report.duplicates)}, unreadable {len(report.unreadable)}, "
        f"days that differ {len(report.day_mismatches)}"
    ]
    for mistake, count in report.mistakes().items():
        lines.append(f"  likely mistake in {count} rows: {mistake}")
    for mismatch in report.mismatched[:show]:
        lines.append(
            f"  mismatch {mismatch.key}: {', '.join(mismatch.fields)}; ours "
            f"{_counts(mismatch.ours)}, theirs {_counts(mismatch.theirs)}"
            + (f" -> {'; '.join(mismatch.diagnosis)}" if mismatch.diagnosis else "")
        )
    lines += [f"  missing from theirs: {rid}" for rid in report.missing[:show]]
    lines += [f"  extra in theirs: {rid}" for rid in report.extra[:show]]
    lines += [f"  listed twice in theirs: {where}" for where in report.duplicates[:show]]
    lines += [f"  unreadable in theirs: {where}" for where in report.unreadable[:show]]
    lines += [f"  day differs: {day}" for day in report.day_mismatches]
    lines.append("per day (rows ours/theirs, cost ours/theirs):")
    for day, totals in sorted(report.days.items()):
        lines.append(
            f"  {day}: {totals['ours']}/{totals['theirs']} rows, "
            f"${plain(totals['ours_cost'])}/${plain(totals['theirs_cost'])}"
        )
    lines.append("clean: everything matches" if report.clean else "differences found")
    return "\n".join(lines)


def _counts(record: Record) -> str:
    inp, cached, out, reasoning = record.counts
    cost = plain(record.cost) if record.cost is not None else "-"
    return f"in {inp} cached {cached} out {out} reasoning {reasoning} ${cost}"
