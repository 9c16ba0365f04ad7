"""Estimate a request's token usage when the upstream reported none it can be billed by.

A stream that ends without its terminal event carries no usage, and an answer may come with
none or with counts that are not counts; yet the upstream did the work. Rather than bill it
as free, the gateway counts tokens itself with the o200k_base vocabulary (the GPT-5
family's): input from the text of the request body, output from what was streamed (text,
refusals, tool arguments and reasoning summaries) or from the same parts of a JSON answer's
output items. Hidden reasoning is never sent, so the estimate is a lower bound; rows billed
this way are flagged `estimated`. The vocabulary ships inside the `bpe-openai` wheel, so
nothing is downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from codex_gateway.relay.sse import upstream_json

ENCODING = "o200k_base"
# Keys whose values are identifiers or opaque data, not text the model reads as tokens.
_SKIPPED_KEYS = frozenset(
    {"type", "id", "call_id", "role", "status", "encrypted_content", "item_id", "model"}
)
# Request fields the model reads.
_INPUT_FIELDS = ("instructions", "input", "tools", "text")


class TokenCounter:
    """Counts tokens with the bundled vocabulary, loaded the first time it is needed.

    Loaded, the vocabulary takes about 130 MB of memory, and only a request billed without
    the upstream's usage needs it; so a gateway whose upstreams always report usage never pays
    for it.
    """

    def __init__(self) -> None:
        self._encoding: Any = None
        self._loading = threading.Lock()

    def load(self) -> None:
        with self._loading:  # estimates run in threads: the first two must not both load
            if self._encoding is not None:
                return
            import bpe_openai  # a 70 MB extension: imported only by the process that serves

            self._encoding = bpe_openai.get_encoding(ENCODING)

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._encoding is None:
            self.load()
        return len(self._encoding.encode(text, disallowed_special=()))

    def estimate(self, request: dict[str, Any], deltas: Iterable[bytes]) -> dict[str, Any]:
        """A Responses-shaped usage object for `request` and the streamed delta events."""
        return self._usage(request, "".join(delta_texts(deltas)))

    def estimate_answer(self, request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        """The same for `request` and a JSON answer, counting what a stream of it would have
        carried as deltas."""
        return self._usage(request, "".join(answer_texts(answer.get("output"))))

    def _usage(self, request: dict[str, Any], output: str) -> dict[str, Any]:
        input_tokens = self.count("\n".join(request_texts(request)))
        output_tokens = self.count(output)
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }


def request_texts(request: dict[str, Any]) -> list[str]:
    texts: list[str] = []
    for name in _INPUT_FIELDS:
        if name in request:
            texts.extend(_strings(request[name]))
    return texts


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _SKIPPED_KEYS:
                yield from _strings(item)


# Per output item type, the fields a stream sends as deltas: (field, its parts' text field).
_ITEM_TEXTS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "message": (("content", "text"), ("content", "refusal")),
    "reasoning": (("summary", "text"), ("content", "text")),
    "function_call": (("arguments", None),),
    "custom_tool_call": (("input", None),),
}


def answer_texts(output: Any) -> Iterator[str]:
    """The text of a JSON answer's output items that a stream of it sends as deltas: message
    text and refusals, reasoning summaries and text, tool call arguments and input."""
    if not isinstance(output, list):
        return
    for item in output:
        if not isinstance(item, dict):
            continue
        for name, part_field in _ITEM_TEXTS.get(str(item.get("type")), ()):
            value = item.get(name)
            if part_field is None:
                if isinstance(value, str):
                    yield value
            elif isinstance(value, list):
                for part in value:
                    text = part.get(part_field) if isinstance(part, dict) else None
                    if isinstance(text, str):
                        yield text


def delta_texts(deltas: Iterable[bytes]) -> Iterator[str]:
    """The `delta` strings of SSE event blocks (see `StreamScanner.deltas`)."""
    for block in deltas:
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = upstream_json(line[5:])
            delta = data.get("delta") if isinstance(data, dict) else None
            if isinstance(delta, str):
                yield delta
