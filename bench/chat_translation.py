"""Cost of the Chat Completions translation and of sealed tokens, per event and per call.

Run: .venv/bin/python bench/chat_translation.py
"""

from __future__ import annotations

import time
from pathlib import Path

from codex_gateway.relay.chat import ChatStreamTranslator
from codex_gateway.relay.sse import parse_events
from codex_gateway.upstream.sealing import TokenCipher

TRANSCRIPT = Path(__file__).resolve().parent.parent / "codex_gateway/sandbox/transcripts"
STREAMS = 200


def main() -> None:
    events = parse_events((TRANSCRIPT / "responses-text.sse").read_bytes())
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    stream = [events[0], *deltas * 286, events[-1]]  # a long answer: 2,004 events

    started = time.perf_counter()
    for _ in range(STREAMS):
        translator = ChatStreamTranslator("gpt-5.1-codex", True)
        for event in stream:
            translator.feed(event)
    per_event = (time.perf_counter() - started) / (STREAMS * len(stream)) * 1e6
    print(f"translate: {len(stream)} events x {STREAMS} streams, {per_event:.2f} us per event")

    started = time.perf_counter()
    cipher = TokenCipher("x" * 40)
    derive_ms = (time.perf_counter() - started) * 1000
    print(f"key derivation (scrypt n=2^14, then HKDF): {derive_ms:.1f} ms, once per process")

    sealed = cipher.seal("a" * 1500)
    started = time.perf_counter()
    for _ in range(2000):
        cipher.open(sealed)
    print(f"open a sealed 1.5 KB token: {(time.perf_counter() - started) / 2000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
