"""Processes the benchmark starts, pinned to a core, and what /proc says about them.

Every process is started in a session of its own and recorded, so that `stop_all` can end
it and anything it started (its process group) even when the run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PROXY_CORE = 0
PR_SET_PDEATHSIG = 1
LOAD_CORE = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Environment variables that would send a child's HTTP requests anywhere but loopback.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY")


def cores_available() -> bool:
    """True when both benchmark cores exist, so processes can be pinned apart."""
    return {PROXY_CORE, LOAD_CORE} <= os.sched_getaffinity(0)


def pinned(argv: Sequence[str], core: int | str | None) -> list[str]:
    """`argv` under taskset on `core`: one core, or a list such as "0,1"."""
    if core is None or not cores_available():
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def proxy_cores(text: str) -> str:
    """The cores given to the proxy under test, as taskset takes them ("0" or "0,1"); each
    must be one this process may run on."""
    try:
        cores = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise ValueError(f"cores are numbers separated by commas, not {text!r}") from None
    usable = os.sched_getaffinity(0)
    missing = [core for core in cores if core not in usable]
    if missing:
        raise ValueError(f"no such core here: {', '.join(map(str, missing))}")
    return ",".join(map(str, cores))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without proxies or gateway settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in PROXY_VARIABLES and not name.startswith("CODEX_GATEWAY_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class Processes:
    """The processes this run started; each one logs to a file of its own."""

    def __init__(self, logs: Path):
        self._logs = logs
        self._running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        core: int | str | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self._logs / f"{name}.log"
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                pinned(argv, core),
                env=env if env is not None else child_env(),
                cwd=cwd,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._running.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self._logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL if it is still there after `grace`."""
        if proc in self._running:
            self._running.remove(proc)
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # Anything the process started and left behind in its group goes too.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc, grace=5.0)


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM should this run be killed outright."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def rss_kb(pid: int) -> int:
    """Resident memory of the process tree (VmRSS summed), in KiB."""
    total = 0
    for member in tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process tree so far."""
    ticks = 0
    for member in tree(pid):
        stat = _stat(member)
        if stat is not None:
            ticks += int(stat[11]) + int(stat[12])
    return ticks / CLOCK_TICKS


class PeakMemory:
    """Samples a process tree's RSS in a thread while a measurement runs."""

    def __init__(self, pid: int, interval: float = 0.05):
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_kb = 0

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb(self._pid))
            time.sleep(self._interval)
