"""The benchmark's smoke mode runs every part end to end and writes its report.

It checks that the benchmark works, never that anything is fast: CI runs it on a busy
machine. LiteLLM is not installed in smoke mode, and its row says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_smoke_mode_measures_direct_and_gateway_rows_and_writes_the_report(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
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
    assert "codex-gateway, billing on, SQLite" in markdown
    assert "not run: smoke mode" in markdown
    assert "Host steadiness: a fixed Python loop took " in markdown
    assert "steal time during the run: " in markdown
