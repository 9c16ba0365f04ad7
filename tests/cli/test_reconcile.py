"""`usage export` then `reconcile`: our own export reconciles clean; altered ones are named."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from codex_gateway.cli import reconcile as reconcile_cli
from tests.conftest import CLI, Gateway


@pytest.fixture(scope="module")
def exported(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three billed requests of one user, exported as CSV."""
    user, key = gateway.new_user("5")
    for transcript in ("responses-text", "responses-cached", "responses-reasoning-tool"):
        response = httpx.post(
            gateway.url + "/v1/responses",
            content=b'{"model":"gpt-5.1-codex","input":"hi"}',
            headers={"Authorization": f"Bearer {key}", "x-sandbox-transcript": transcript},
            timeout=30,
        )
        gateway.usage_row(response.headers["x-request-id"])
    folder = tmp_path_factory.mktemp("export")
    gateway.cli("usage", "export", "--format", "csv", "--output", str(folder / "all.csv"))
    rows = [r for r in rows_of(folder / "all.csv") if r["user"] == user]
    assert len(rows) == 3
    mine = folder / "mine.csv"
    with mine.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return mine


def rows_of(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def write(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_our_own_export_reconciles_clean_against_everything_in_its_days(
    gateway: Gateway, exported: Path, tmp_path: Path
) -> None:
    everything = tmp_path / "everything.jsonl"
    gateway.cli("usage", "export", "--format", "jsonl", "--output", str(everything))
    lines = [json.loads(line) for line in everything.read_text().splitlines()]
    assert lines and all("cost_usd" in line for line in lines)
    result = gateway.cli("reconcile", str(everything))
    assert result.returncode == 0
    assert "clean: everything matches" in result.stdout


def test_swapped_doubled_and_missing_rows_are_each_named(
    gateway: Gateway, exported: Path, tmp_path: Path
) -> None:
    rows = rows_of(exported)
    text, cached = (
        next(r for r in rows if r["cached_tokens"] == "0"),
        next(r for r in rows if r["cached_tokens"] == "11465"),
    )
    text["input_tokens"], text["output_tokens"] = text["output_tokens"], text["input_tokens"]
    cached["input_tokens"] = str(int(cached["input_tokens"]) + int(cached["cached_tokens"]))
    altered = [text, cached]  # the third request is left out
    result = gateway.cli(
        "reconcile", str(write(tmp_path / "theirs.csv", altered)), "--show", "50", check=False
    )
    assert result.returncode == 1
    assert "likely mistake in 1 rows: input and output swapped" in result.stdout
    assert "likely mistake in 1 rows: cached tokens counted twice" in result.stdout
    assert "missing from theirs" in result.stdout
    report = result.stdout.split("per day")[0]
    missing_lines = [line for line in report.splitlines() if "missing from theirs:" in line]
    assert any(line.endswith(r["request_id"]) for r in rows for line in missing_lines)


def test_progress_is_shown_for_large_files(
    gateway: Gateway, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile_cli, "PROGRESS_EVERY", 1)
    result = gateway.cli("reconcile", str(exported), check=False)
    assert f"read 3 rows of {exported.name}" in result.stderr


def test_a_duplicated_row_and_unreadable_values_are_reported_by_line(
    gateway: Gateway, exported: Path, tmp_path: Path
) -> None:
    rows = rows_of(exported)
    broken = dict(rows[1], input_tokens="abc", cost_usd="free")
    their_rows = [rows[0], rows[0], broken, rows[2]]
    result = gateway.cli("reconcile", str(write(tmp_path / "theirs.csv", their_rows)), check=False)
    assert result.returncode == 1
    assert f"listed twice in theirs: {rows[0]['request_id']} at line 3 (first at line 2)" in (
        result.stdout
    )
    assert (
        f"unreadable in theirs: line 4 ({rows[1]['request_id']}): input_tokens='abc', "
        "cost_usd='free'" in result.stdout
    )
    assert "clean" not in result.stdout.splitlines()[-1]


def test_a_broken_json_line_is_reported_not_skipped(
    gateway: Gateway, exported: Path, tmp_path: Path
) -> None:
    lines = [json.dumps(row) for row in rows_of(exported)]
    their_file = tmp_path / "theirs.jsonl"
    their_file.write_text("\n".join([*lines, '{"request_id": "req_x", "cost']) + "\n")
    result = gateway.cli("reconcile", str(their_file), check=False)
    assert result.returncode == 1
    assert "unreadable in theirs: line 4" in result.stdout


LONG_FIELD = "x" * (131_072 + 1)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # Not UTF-8: from the first byte, on a later CSV line, in a JSON line.
        ("first.csv", b"\xff\xfe garbage", "line 1 (byte offset 0) is not UTF-8"),
        (
            "later.csv",
            b"request_id,cost_usd\nreq_1,1\nreq_2,\xe9\n",
            "line 3 (byte offset 34) is not UTF-8",
        ),
        (
            "lines.jsonl",
            b'{"request_id": "req_1"}\n{"request_id": "\xff"}\n',
            "line 2 (byte offset 40) is not UTF-8",
        ),
    ],
)
def test_a_file_that_is_not_utf8_is_refused_naming_where(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = reconcile_alone(path, tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"Error: {path}: {message}; the file must be UTF-8\n"


def test_a_csv_field_over_the_limit_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text(f"request_id,cost_usd\nreq_1,1\nreq_2,{LONG_FIELD}\n")
    result = reconcile_alone(path, tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"Error: {path}: line 3: a field is longer than 131,072 characters\n"


def test_a_csv_with_no_id_column_is_refused_naming_the_columns_it_has(tmp_path: Path) -> None:
    path = tmp_path / "anonymous.csv"
    path.write_text("ref,input_tokens,cost\nreq_1,10,0.5\n")
    result = reconcile_alone(path, tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: {path} has no request_id column (nor response_id) to match rows by; its "
        "columns are 'ref', 'input_tokens', 'cost' (--map THEIRS=request_id names one)\n"
    )


def test_a_csv_whose_id_column_is_mapped_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mapped.csv"
    path.write_text("ref,input_tokens,cost\nreq_1,10,0.5\n")
    result = reconcile_alone(path, tmp_path, "--map", "ref=request_id")
    assert result.returncode == 1
    assert "extra in theirs: req_1" in result.stdout


def reconcile_alone(path: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`codex-gateway reconcile PATH` as its own process, so that a traceback would show."""
    env = {"CODEX_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db", "PATH": ""}
    result = subprocess.run(
        [*CLI, "reconcile", str(path), *extra],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result
