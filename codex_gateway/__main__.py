from __future__ import annotations

from codex_gateway.cli.main import main

main()
