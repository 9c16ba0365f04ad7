"""codex-gateway: a self-hosted API gateway for OpenAI's Codex models with exact billing."""

from __future__ import annotations

__version__ = "0.1.0"
