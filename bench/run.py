"""The benchmark: direct to a mock upstream, codex-gateway on SQLite and PostgreSQL, LiteLLM.

    .venv/bin/python -m bench.run            # the whole run, about eight minutes
    .venv/bin/python -m bench.run --smoke    # everything tiny: checks that it works, not speed

Starts every process itself (the proxy under test pinned to core 0, or to the cores
`--proxy-cores` names; the mock upstream, wrk and the stream client to core 1), measures each
row in turn, stops everything (also on failure or Ctrl-C), and writes bench/results/<date>.md
and .json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, targets
from bench.loads import LoadError, request_body, streams, wrk
from bench.procs import (
    LOAD_CORE,
    PROXY_CORE,
    Processes,
    cores_available,
    cpu_seconds,
    proxy_cores,
    rss_kb,
    tree,
)
from bench.targets import Target, Unavailable, writer_counts

HERE = Path(__file__).resolve().parent
MOCK = HERE / "mock_upstream.py"
ROWS = ("direct", "bare", "sqlite", "postgresql", "litellm")
PG_ADMIN_URL = os.environ.get(
    "CODEX_GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
STALL_MS = 200.0  # ten times the pacing
# The steps around which a gateway's counts of requests that waited for its writer are read.
COUNTED_STEPS = ("latency_c1", "rps_c64")


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    latency_s: float
    rps_s: float
    ttfe_streams: int
    paced_c1_streams: int
    streams_many: int
    many_per_connection: int
    steps: tuple[int, ...]
    hold_s: float
    ramp_s: float
    quiet_s: float


FULL = Plan(2, 10, 10, 500, 15, 256, 2, (100, 250, 500, 750, 1000), 3.0, 1.0, 10.0)
SMOKE = Plan(1, 1, 1, 20, 1, 8, 1, (4, 8), 0.5, 0.1, 2.0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    plan = SMOKE if args.smoke else FULL
    missing = _missing_tools(install=not args.no_install)
    if missing:
        print("cannot run the benchmark: " + "; ".join(missing), file=sys.stderr)
        return 2
    _raise_file_limit()
    started = datetime.now()
    stamp = started.strftime("%Y-%m-%d_%H%M%S") + ("-smoke" if args.smoke else "")
    out = Path(args.out)
    logs = out / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {
        "date": stamp,
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "smoke": args.smoke,
        "plan": asdict(plan),
        "pinned": cores_available(),
        "proxy_cores": args.proxy_cores,
        "workers": args.workers,
        "machine": report.machine(PG_ADMIN_URL),
        "rows": [],
    }
    procs = Processes(logs)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run["rows"] = _run_rows(procs, plan, args, logs)
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
    run["load_average_at_end"] = list(os.getloadavg())
    run["host_at_end"] = report.host_probe()
    md, js = report.write(run, out)
    print(md.read_text())
    print(f"written: {md} and {js}")
    return _verdict(run) if args.smoke else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check it works")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the report goes")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument(
        "--proxy-cores",
        default=str(PROXY_CORE),
        help=f"the cores the proxy under test may use, separated by commas "
        f"(default {PROXY_CORE}; the load runs on core {LOAD_CORE} whatever this says)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="install neither wrk nor LiteLLM when missing"
    )
    args = parser.parse_args(argv)
    try:
        args.proxy_cores = proxy_cores(args.proxy_cores)
    except ValueError as exc:
        parser.error(f"--proxy-cores: {exc}")
    if args.workers < 1:
        parser.error(f"--workers: at least 1, not {args.workers}")
    default = ROWS if not args.smoke else ("direct", "bare", "sqlite", "postgresql")
    args.rows = tuple(args.rows.split(",")) if args.rows is not None else default
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        names = ", ".join(repr(name) for name in sorted(unknown))
        parser.error(f"unknown rows: {names} (the rows are {', '.join(ROWS)})")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _missing_tools(install: bool) -> list[str]:
    if shutil.which("wrk") is None and install and os.geteuid() == 0:
        print("wrk is not installed; installing it with apt-get", flush=True)
        install_wrk = ["apt-get", "install", "-y", "-q", "wrk"]
        done = subprocess.run(install_wrk, capture_output=True, timeout=600)
        if done.returncode != 0:  # a fresh machine may not have read the package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install_wrk, capture_output=True, timeout=600)
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk is not installed (Debian: apt-get install wrk)")
    if shutil.which("taskset") is None:
        missing.append("taskset is not installed (Debian: apt-get install util-linux)")
    for module in ("httptools", "uvloop", "orjson"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module} is missing (pip install -e .)")
    return missing


def _raise_file_limit() -> None:
    """A thousand streams take two thousand sockets in the proxy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_rows(
    procs: Processes, plan: Plan, args: argparse.Namespace, logs: Path
) -> list[dict[str, Any]]:
    mock_port = free_port()
    mock_url = f"http://127.0.0.1:{mock_port}/v1"
    mock = procs.start(
        "mock", [sys.executable, str(MOCK), "--port", str(mock_port)], core=LOAD_CORE
    )
    targets.wait_http(f"http://127.0.0.1:{mock_port}/health", 30, mock)
    rows = []
    for name in ROWS:
        if name not in args.rows:
            if name == "litellm" and args.smoke:
                rows.append(_row_status(name, "LiteLLM", "not run", "smoke mode"))
            continue
        print(f"== {name}", flush=True)
        opened = _open_target(name, procs, mock_url, mock.pid, logs / name, args)
        rows.append(_measure_row(name, opened, plan))
    return rows


def _open_target(
    name: str,
    procs: Processes,
    mock_url: str,
    mock_pid: int,
    work: Path,
    args: argparse.Namespace,
) -> AbstractContextManager[Target]:
    if name == "direct":
        return targets.direct(mock_url, mock_pid)
    if name == "bare":
        return targets.bare_hop(procs, mock_url, free_port(), work, args.proxy_cores)
    if name == "litellm":
        return targets.litellm(
            procs, mock_url, free_port(), work, not args.no_install, args.proxy_cores
        )
    return targets.gateway(
        procs, name, mock_url, free_port(), work, PG_ADMIN_URL, args.workers, args.proxy_cores
    )


def _row_status(name: str, label: str, status: str, reason: str) -> dict[str, Any]:
    return {"name": name, "label": label, "status": status, "reason": reason}


def _measure_row(name: str, opened: AbstractContextManager[Target], plan: Plan) -> dict[str, Any]:
    try:
        with opened as target:
            row: dict[str, Any] = {
                "name": target.name,
                "label": target.label,
                "status": "ok",
                "notes": list(target.notes),
            }
            row["processes"] = _processes(target.pid)
            row.update(measure(target, plan))
            if name == "litellm":
                row["notes"].append(_foreign_connections(target.pid))
            return row
    except Unavailable as exc:
        print(f"   {name}: unavailable: {exc}", flush=True)
        return _row_status(name, _label(name), "unavailable", str(exc))


def _processes(pid: int) -> list[dict[str, Any]]:
    """The proxy's processes (a supervisor and its workers) and the cores each may run on."""
    found = []
    for member in tree(pid):
        with contextlib.suppress(OSError):
            found.append({"pid": member, "cores": sorted(os.sched_getaffinity(member))})
    return found


def _label(name: str) -> str:
    labels = {
        "bare": "bare Python hop",
        "sqlite": "codex-gateway, SQLite",
        "postgresql": "codex-gateway, PostgreSQL",
    }
    return labels.get(name, name)


def measure(target: Target, plan: Plan) -> dict[str, Any]:
    """Every measure of one row; a measure whose load generator failed says so and is skipped."""
    plain, stream = request_body("bench-model", False), request_body("bench-model", True)
    result: dict[str, Any] = {}

    def step(name: str, run: Callable[[], dict[str, Any]]) -> None:
        print(f"   {name}", flush=True)
        counted = name in COUNTED_STEPS
        before = writer_counts(target) if counted else None
        _quiet(target.pid, plan.quiet_s)
        try:
            result[name] = run()
        except (LoadError, subprocess.TimeoutExpired) as exc:
            result[name] = {"failed": str(exc)[:500]}
            return
        after = writer_counts(target) if counted else None
        if before is not None and after is not None:
            result[name] |= {key: after[key] - before[key] for key in after}

    url, key, pid = target.url, target.key, target.pid
    step("warmup", lambda: wrk(url, key, plain, 4, plan.warmup_s) | wrk(url, key, stream, 4, 1))
    _quiet(target.pid, plan.quiet_s)
    idle_kb = rss_kb(pid)
    # Streams first, while the memory they take is not yet hidden by what the heavier
    # measures below leave allocated (Python keeps memory it once used).
    result["stall"] = _stall_steps(target, plan)
    result["memory"] = _memory(idle_kb, result["stall"])
    step("latency_c1", lambda: wrk(url, key, plain, 1, plan.latency_s))
    step(
        "rps_c64",
        lambda: _with_cpu(pid, plan, lambda: wrk(url, key, plain, 64, plan.rps_s)),
    )
    step(
        "stream_rps_c64",
        lambda: _with_cpu(pid, plan, lambda: wrk(url, key, stream, 64, plan.rps_s)),
    )
    step("ttfe_c1", lambda: streams(url, key, "bench-model", 1, per_connection=plan.ttfe_streams))
    step(
        "paced_c1",
        lambda: streams(url, key, "bench-paced", 1, per_connection=plan.paced_c1_streams),
    )
    step(
        "paced_many",
        lambda: streams(
            url,
            key,
            "bench-paced",
            plan.streams_many,
            per_connection=plan.many_per_connection,
            ramp=plan.ramp_s,
        ),
    )
    return result


def _with_cpu(pid: int, plan: Plan, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A load run with the proxy's CPU time, counted until the proxy has gone quiet again: a
    proxy that puts work off (bills written after the load stops) pays for it here too, and
    `after_load_s` says how long it kept working once the load had stopped."""
    before = cpu_seconds(pid)
    result = run()
    result["after_load_s"] = round(_quiet(pid, plan.quiet_s), 2)
    used = cpu_seconds(pid) - before
    result["cpu_seconds"] = round(used, 3)
    if result["requests"]:
        result["cpu_ms_per_1k"] = round(used * 1e6 / result["requests"], 1)
    return result


def _quiet(pid: int, limit: float) -> float:
    """Wait until the proxy has finished its own work (bills still being written, say); the
    seconds that took, not counting the last quiet quarter second."""
    started = time.monotonic()
    deadline = started + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - last < 0.01:
            return max(0.0, time.monotonic() - started - 0.25)
        last = now
    return time.monotonic() - started


def _stall_steps(target: Target, plan: Plan) -> dict[str, Any]:
    """Step the number of concurrent paced streams up until one step stalls or errs."""
    steps: list[dict[str, Any]] = []
    most_held = 0
    for count in plan.steps:
        print(f"   {count} paced streams", flush=True)
        _quiet(target.pid, plan.quiet_s)
        before_kb = rss_kb(target.pid)
        try:
            result = streams(
                target.url,
                target.key,
                "bench-paced",
                count,
                duration=plan.hold_s,
                ramp=plan.ramp_s,
                timeout=plan.hold_s + plan.ramp_s + 60,
                watch_pid=target.pid,
            )
        except (LoadError, subprocess.TimeoutExpired) as exc:
            steps.append({"streams": count, "held": False, "why": str(exc)[:300]})
            break
        why = _why_not_held(result, count)
        step = {"streams": count, "held": why is None, "why": why, "rss_before_kb": before_kb}
        steps.append(step | result)
        if why is not None:
            break
        most_held = count
    return {"most_held": most_held, "steps": steps}


def _why_not_held(result: dict[str, Any], count: int) -> str | None:
    if result["errors"]:
        return f"{result['errors']} error(s): {'; '.join(result['first_errors'])}"
    if result["stalls"]:
        longest = result["gap_ms"]["max"]
        return f"{result['stalls']} gap(s) over {STALL_MS:g} ms, the longest {longest:.0f} ms"
    if result["most_in_flight"] < count:
        return f"only {result['most_in_flight']} streams were in flight at once"
    return None


def _memory(idle_kb: int, stall: dict[str, Any]) -> dict[str, Any]:
    memory: dict[str, Any] = {"idle_kb": idle_kb, "idle_mb": round(idle_kb / 1024, 1)}
    held = [step for step in stall["steps"] if step["held"] and step.get("peak_rss_kb")]
    if held:
        top = held[-1]
        growth = max(0, top["peak_rss_kb"] - idle_kb)
        memory["peak_kb"] = top["peak_rss_kb"]
        memory["at_streams"] = top["streams"]
        memory["kb_per_stream"] = round(growth / top["streams"], 1)
        memory["mb_per_1k_streams"] = round(growth / top["streams"] * 1000 / 1024, 1)
    return memory


def _foreign_connections(pid: int) -> str:
    """Any TCP connection of the process tree to an address other than loopback, per `ss`."""
    pids = {str(member) for member in tree(pid)}
    done = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, timeout=20)
    foreign = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) < 6 or not any(f"pid={p}," in fields[5] for p in pids):
            continue
        peer = fields[4]
        if not peer.startswith(("127.", "[::1]", "[::ffff:127.")):
            foreign.append(peer)
    if foreign:
        return "connections to other addresses seen: " + ", ".join(sorted(set(foreign)))
    return "no connection to any address but loopback was open at the end of the row (ss)"


def _verdict(run: dict[str, Any]) -> int:
    """Smoke mode: the direct row and every gateway row ran, with numbers and no errors."""
    problems = []
    for row in run["rows"]:
        if row["name"] == "litellm":
            continue
        if row["status"] != "ok":
            if row["name"] in ("direct", "sqlite"):
                problems.append(f"{row['name']}: {row['status']}: {row.get('reason')}")
            continue
        for name in (
            "latency_c1",
            "rps_c64",
            "stream_rps_c64",
            "ttfe_c1",
            "paced_c1",
            "paced_many",
        ):
            measured = row.get(name, {})
            if "failed" in measured or measured.get("errors"):
                problems.append(f"{row['name']} {name}: {measured}")
        if not row["stall"]["most_held"]:
            problems.append(
                f"{row['name']}: no step of paced streams held: {row['stall']['steps']}"
            )
    for problem in problems:
        print("smoke check failed: " + problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
