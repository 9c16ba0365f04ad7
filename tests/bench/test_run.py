"""The benchmark's smoke mode runs every part end to end and writes its report.

It checks that the benchmark works, never that anything is fast: CI runs it on a busy
machine. LiteLLM is not installed in smoke mode, and its row says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def bench_run(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_smoke_mode_measures_direct_and_gateway_rows_and_writes_the_report(
    tmp_path: Path,
) -> None:
    done = bench_run("--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (report,) = tmp_path.glob("*-smoke.json")
    run = json.loads(report.read_text())
    rows = {row["name"]: row for row in run["rows"]}
    assert rows["litellm"]["status"] == "not run"
    for name in ("direct", "bare", "gateway-sqlite", "gateway-postgresql"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["latency_c1"]["p50_ms"] > 0
        assert row["rps_c64"]["rps"] > 0
        assert row["paced_c1"]["gap_ms"]["p99"] > 0
        assert row["paced_many"]["completed"] > 0
        assert row["stall"]["most_held"] > 0
        assert row["memory"]["idle_kb"] > 0
    # only the gateway counts the requests that waited for its usage writer
    for name in ("gateway-sqlite", "gateway-postgresql"):
        for step in ("latency_c1", "rps_c64"):
            assert rows[name][step]["writer_waits"] >= 0
            assert rows[name][step]["writer_paces"] >= 0
        assert "writer_waits" not in rows[name]["ttfe_c1"]  # read around two steps only
    assert "writer_waits" not in rows["direct"]["latency_c1"]
    # the proxies alone on core 0, each one process
    for name in ("bare", "gateway-sqlite", "gateway-postgresql"):
        assert [process["cores"] for process in rows[name]["processes"]] == [[0]]
    assert run["machine"]["cpu_model"]
    assert run["machine"]["packages"]["uvicorn"]
    for probe in (run["machine"]["host_at_start"], run["host_at_end"]):
        assert len(probe["loop_ms"]) == 5 and min(probe["loop_ms"]) > 0
        assert probe["cpu_ticks"]["total"] > probe["cpu_ticks"]["steal"] >= 0
    ticks = (
        run["host_at_end"]["cpu_ticks"]["total"]
        - run["machine"]["host_at_start"]["cpu_ticks"]["total"]
    )
    assert ticks > 0

    markdown = report.with_suffix(".md").read_text()
    assert "| latency p50, c=1, ms (added) |" in markdown
    assert "| requests held for the usage writer (paced), c=1 / c=64 |" in markdown
    assert "codex-gateway, billing on, SQLite" in markdown
    assert "not run: smoke mode" in markdown
    assert "Host steadiness: a fixed Python loop took " in markdown
    assert "steal time during the run: " in markdown


def test_smoke_mode_runs_the_gateway_as_two_workers_on_the_cores_given(tmp_path: Path) -> None:
    """`--workers 2 --proxy-cores 0,1`: both workers answer, their CPU is counted, and the
    report says which cores the proxy had and that it shared one with the load."""
    command = ["--smoke", "--rows", "direct,sqlite", "--workers", "2", "--proxy-cores", "0,1"]
    done = bench_run(*command, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (report,) = tmp_path.glob("*-smoke.json")
    run = json.loads(report.read_text())
    assert (run["proxy_cores"], run["workers"]) == ("0,1", 2)
    rows = {row["name"]: row for row in run["rows"]}
    row = rows["gateway-sqlite"]
    assert row["status"] == "ok", row
    assert row["label"] == "codex-gateway, billing on, SQLite, 2 workers"
    # `serve` and the two workers it started, each free to run on both cores
    assert [process["cores"] for process in row["processes"]] == [[0, 1]] * 3
    assert row["rps_c64"]["rps"] > 0 and row["rps_c64"]["cpu_seconds"] > 0
    assert row["paced_many"]["completed"] > 0
    assert "writer_waits" not in row["rps_c64"]  # each worker counts only its own
    markdown = report.with_suffix(".md").read_text()
    assert "pinned to cores 0,1 (the gateway as 2 worker processes)" in markdown
    assert "The proxy shares core 1 with the load." in markdown


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # cores this machine lacks, or text that names no core
        (["--proxy-cores", "0,4096"], "--proxy-cores: no such core here: 4096"),
        (["--proxy-cores", "0-1"], "--proxy-cores: cores are numbers separated by commas"),
        # no worker at all
        (["--workers", "0"], "--workers: at least 1, not 0"),
        # an empty or unknown row name
        (["--rows", "direct,"], "unknown rows: '' (the rows are direct, bare,"),
        (["--rows", "sqlite,mysql"], "unknown rows: 'mysql'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    done = bench_run("--smoke", *arguments, "--out", str(tmp_path / "out"), timeout=60)

    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()
