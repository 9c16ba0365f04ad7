"""The benchmark report's account of how steady the host was, and of which commit ran."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.report import gateway_source, host_probe, steadiness_line, steal_percent


def probe(loop_ms: list[int], total: int, steal: int) -> dict[str, Any]:
    return {"loop_ms": loop_ms, "cpu_ticks": {"total": total, "steal": steal}}


@pytest.mark.parametrize(
    ("start", "end", "percent"),
    [
        # 30 of the 1,000 ticks between the two readings went to other guests
        (probe([1], 5_000, 100), probe([1], 6_000, 130), 3.0),
        # none stolen
        (probe([1], 5_000, 100), probe([1], 5_500, 100), 0.0),
        # no reading, or no time between the two: not known
        ({"loop_ms": [1], "cpu_ticks": None}, probe([1], 6_000, 130), None),
        (probe([1], 5_000, 100), probe([1], 5_000, 100), None),
    ],
)
def test_steal_is_the_share_of_the_ticks_between_the_readings(
    start: dict[str, Any], end: dict[str, Any], percent: float | None
) -> None:
    assert steal_percent(start, end) == percent


def test_the_report_line_shows_the_loop_times_and_the_steal() -> None:
    line = steadiness_line(probe([392, 505, 450], 5_000, 100), probe([374], 6_000, 130))
    assert "took 392–505 ms at the start and 374 ms at the end" in line
    assert "steal time during the run: 3.0 % of the CPU time" in line


def test_a_probe_of_this_machine_times_its_loop_and_reads_its_ticks() -> None:
    taken = host_probe()
    assert len(taken["loop_ms"]) == 5 and min(taken["loop_ms"]) > 0
    assert taken["cpu_ticks"]["total"] > taken["cpu_ticks"]["steal"] >= 0


def test_the_commit_is_that_of_the_package_the_gateway_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout named in PYTHONPATH, as when another commit is measured from a worktree,
    not the checkout the benchmark was started from."""
    package = tmp_path / "codex_gateway"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a package"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    source = gateway_source()

    assert source == {"gateway_package": str(package), "git_commit": head, "git_dirty": False}
