"""The version and the git commit it was built from, shown by `version` and `/healthz`.

An image bakes the commit into `CODEX_GATEWAY_BUILD_COMMIT` at build time; a checkout asks
git; anything else says "unknown" rather than guessing.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from codex_gateway import __version__

COMMIT_VARIABLE = "CODEX_GATEWAY_BUILD_COMMIT"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class BuildInfo:
    version: str
    commit: str

    def line(self) -> str:
        return f"codex-gateway {self.version} (commit {self.commit})"


def build_info() -> BuildInfo:
    return BuildInfo(__version__, os.environ.get(COMMIT_VARIABLE, "").strip() or _git_commit())


def _git_commit() -> str:
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return UNKNOWN
    try:
        result = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return UNKNOWN
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else UNKNOWN
