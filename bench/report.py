"""The machine a run measured on, and the run written as Markdown and JSON.

Each measure is shown per row; "added" figures are the row's minus the direct baseline's.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import LOAD_CORE, PROXY_CORE

PACKAGES = (
    "codex-gateway",
    "uvicorn",
    "httptools",
    "uvloop",
    "aiohttp",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "orjson",
)


def machine(pg_admin_url: str) -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": sorted(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "wrk": _output(["wrk", "-v"]).split(" [")[0],
        "postgresql": _output(["psql", pg_admin_url, "-tAc", "show server_version"]),
        **gateway_source(),
        "load_average_at_start": list(os.getloadavg()),
        "host_at_start": host_probe(),
    }


def gateway_source() -> dict[str, Any]:
    """The commit of the codex_gateway package the gateway rows run: the one a child
    process imports with this environment (`PYTHONPATH` first), which need not be the
    checkout the benchmark itself was started from."""
    where = "import codex_gateway, os; print(os.path.dirname(codex_gateway.__file__))"
    # From the root directory, as the gateway runs from its own work folder, not from here.
    folder = _output([sys.executable, "-c", where], cwd="/")
    git = ["git", "-C", folder or "."]
    return {
        "gateway_package": folder,
        "git_commit": _output([*git, "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_output([*git, "status", "--porcelain", "--untracked-files=no"])),
    }


# Iterations of the steadiness probe's loop: about half a second on the machines measured.
PROBE_ITERATIONS = 3_000_000
PROBE_RUNS = 5


def host_probe() -> dict[str, Any]:
    """How fast and how shared the host is right now: a fixed pure Python loop timed a few
    times (on a virtual machine whose neighbours are busy its time moves, and every row's
    with it), and the system's CPU ticks so far, of which `steal` went to other guests."""
    loop_ms = []
    for _ in range(PROBE_RUNS):
        began = time.perf_counter()
        total = 0
        for number in range(PROBE_ITERATIONS):
            total += number
        loop_ms.append(round((time.perf_counter() - began) * 1000))
    return {"loop_ms": loop_ms, "cpu_ticks": _cpu_ticks()}


def _cpu_ticks() -> dict[str, int] | None:
    """The first line of /proc/stat: all ticks (user to steal) and the steal ones alone."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    counts = [int(value) for value in fields[1:9]]
    return {"total": sum(counts), "steal": counts[7]}


def steal_percent(start: dict[str, Any], end: dict[str, Any]) -> float | None:
    """The share of the run's CPU time the hypervisor gave to other guests."""
    before, after = start.get("cpu_ticks"), end.get("cpu_ticks")
    if not before or not after or after["total"] <= before["total"]:
        return None
    stolen = after["steal"] - before["steal"]
    return round(100 * stolen / (after["total"] - before["total"]), 1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output(argv: list[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout or done.stderr else ""
    )


def _get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _ms(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _added(row: dict[str, Any], base: dict[str, Any] | None, path: str) -> str:
    value = _get(row, path)
    if value is None:
        return "—"
    if base is None or row is base or _get(base, path) is None:
        return _ms(value)
    added = value - _get(base, path)
    sign = "+" if added >= 0 else "−"
    return f"{_ms(value)} ({sign}{_ms(abs(added))})"


def _number(
    path: str, unit: str = "", digits: int = 0
) -> Callable[[dict[str, Any], dict[str, Any] | None], str]:
    def show(row: dict[str, Any], _: dict[str, Any] | None) -> str:
        value = _get(row, path)
        if value is None:
            return "—"
        return f"{value:,.{digits}f}{unit}" if isinstance(value, int | float) else str(value)

    return show


def _with_added(path: str) -> Callable[[dict[str, Any], dict[str, Any] | None], str]:
    return lambda row, base: _added(row, base, path)


def _writer_waits(row: dict[str, Any], _: dict[str, Any] | None) -> str:
    shown = []
    for step in ("latency_c1", "rps_c64"):
        held, paced = _get(row, f"{step}.writer_waits"), _get(row, f"{step}.writer_paces")
        shown.append("—" if held is None else f"{held:,} ({paced:,})")
    return "—" if shown == ["—", "—"] else " / ".join(shown)


def _errors(row: dict[str, Any], _: dict[str, Any] | None) -> str:
    paths = (
        "latency_c1.errors",
        "rps_c64.errors",
        "stream_rps_c64.errors",
        "ttfe_c1.errors",
        "paced_c1.errors",
        "paced_many.errors",
    )
    values = [_get(row, path) for path in paths]
    return str(sum(value for value in values if isinstance(value, int)))


# (measure, target, how a row shows it)
MEASURES: list[tuple[str, str, Callable[[dict[str, Any], dict[str, Any] | None], str]]] = [
    ("latency p50, c=1, ms (added)", "added ≤ 0.5", _with_added("latency_c1.p50_ms")),
    ("latency p99, c=1, ms (added)", "added ≤ 1.5", _with_added("latency_c1.p99_ms")),
    ("latency max, c=1, ms", "", _number("latency_c1.max_ms", digits=1)),
    ("requests held for the usage writer (paced), c=1 / c=64", "", _writer_waits),
    ("requests/s, c=64, JSON", "≥ 5,000", _number("rps_c64.rps")),
    ("requests/s, c=64, unpaced streams", "", _number("stream_rps_c64.rps")),
    ("CPU ms per 1,000 JSON requests", "", _number("rps_c64.cpu_ms_per_1k")),
    ("CPU ms per 1,000 unpaced streams", "", _number("stream_rps_c64.cpu_ms_per_1k")),
    ("s busy after the c=64 JSON load stopped", "", _number("rps_c64.after_load_s", digits=2)),
    ("time to first event p50, c=1, ms (added)", "", _with_added("ttfe_c1.ttfe_ms.p50")),
    ("time to first event p99, c=1, ms (added)", "added ≤ 1", _with_added("ttfe_c1.ttfe_ms.p99")),
    ("gap between events p99, c=1, ms (added)", "added ≤ 0.3", _with_added("paced_c1.gap_ms.p99")),
    ("time to first event p50, c=N, ms (added)", "", _with_added("paced_many.ttfe_ms.p50")),
    (
        "time to first event p99, c=N, ms (added)",
        "added ≤ 1",
        _with_added("paced_many.ttfe_ms.p99"),
    ),
    (
        "gap between events p99, c=N, ms (added)",
        "added ≤ 0.3",
        _with_added("paced_many.gap_ms.p99"),
    ),
    ("paced streams held, no stall, no error", "1,000", _number("stall.most_held")),
    ("RSS idle, MB", "≤ 100", _number("memory.idle_mb")),
    ("RSS growth per 1,000 streams, MB", "≤ 40", _number("memory.mb_per_1k_streams")),
    ("errors in the measures above", "0", _errors),
]


def _layout(run: dict[str, Any]) -> str:
    """Which cores the proxy under test and the load had (runs before the choice existed
    pinned the proxy to core 0)."""
    workers = run.get("workers", 1)
    as_workers = f" (the gateway as {workers} worker processes)" if workers > 1 else ""
    if not run["pinned"]:
        return (
            f"Nothing is pinned (this machine lacks core {PROXY_CORE} or {LOAD_CORE}): the proxy "
            f"under test{as_workers} shares every core with the load."
        )
    cores = run.get("proxy_cores", str(PROXY_CORE))
    text = (
        f"The proxy under test is pinned to core{'s' if ',' in cores else ''} {cores}"
        f"{as_workers}; the mock upstream, wrk and the stream client to core {LOAD_CORE}."
    )
    if str(LOAD_CORE) in cores.split(","):
        text += f" The proxy shares core {LOAD_CORE} with the load."
    return text


def markdown(run: dict[str, Any]) -> str:
    rows = [row for row in run["rows"] if row["status"] == "ok"]
    base = next((row for row in rows if row["name"] == "direct"), None)
    many = run["plan"]["streams_many"]
    lines = [
        f"# Benchmark {run['date']}",
        "",
        f"Command: `{run['command']}`"
        + (" (smoke mode: checks it works, not speed)" if run["smoke"] else ""),
        "",
        _machine_line(run["machine"]),
        "",
        _layout(run) + " Added figures are the row's minus the direct row's. "
        f"c=N is {many} concurrent paced streams (64 deltas 20 ms apart).",
        "",
    ]
    if rows:
        header = ["measure", "target", *[row["label"] for row in rows]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name, target, show in MEASURES:
            cells = [show(row, base) for row in rows]
            lines.append(
                f"| {name.replace('c=N', f'c={many}')} | {target} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    for row in run["rows"]:
        lines.append(
            f"**{row['label']}**: {row['status']}"
            + (f": {row['reason']}" if row.get("reason") else "")
        )
        for note in row.get("notes", []):
            lines.append(f"- {note}")
        steps = _get(row, "stall.steps") or []
        if steps:
            shown = ", ".join(
                f"{step['streams']} {'held' if step['held'] else 'not held'}"
                + ("" if step["held"] else f" ({step['why']})")
                for step in steps
            )
            lines.append(f"- paced streams step by step: {shown}")
        lines.append("")
    lines.append(
        f"Load average at the start {run['machine']['load_average_at_start']}, "
        f"at the end {run['load_average_at_end']}."
    )
    lines.append("")
    lines.append(steadiness_line(run["machine"]["host_at_start"], run["host_at_end"]))
    return "\n".join(lines) + "\n"


def steadiness_line(start: dict[str, Any], end: dict[str, Any]) -> str:
    """Whether the host kept its speed: runs on a host whose probe moved compare badly."""
    stolen = steal_percent(start, end)
    steal = "not known" if stolen is None else f"{stolen} % of the CPU time"
    return (
        f"Host steadiness: a fixed Python loop took {_span(start['loop_ms'])} ms at the start "
        f"and {_span(end['loop_ms'])} ms at the end; steal time during the run: {steal}. "
        "When these move, figures of runs on this host compare badly with each other."
    )


def _span(values: list[int]) -> str:
    return f"{min(values)}–{max(values)}" if min(values) != max(values) else str(values[0])


def _machine_line(info: dict[str, Any]) -> str:
    packages = ", ".join(
        f"{name} {version}" for name, version in info["packages"].items() if version
    )
    return (
        f"Machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, "
        f"{info['os']}, kernel {info['kernel']}, Python {info['python']}; {packages}; "
        f"{info['wrk']}; PostgreSQL {info['postgresql'] or 'n/a'}; commit {info['git_commit']}"
        + (" (with local changes)" if info["git_dirty"] else "")
        + "."
    )


def write(run: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = run["date"].replace(":", "-")
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    js.write_text(json.dumps(run, indent=2) + "\n")
    md.write_text(markdown(run))
    return md, js
