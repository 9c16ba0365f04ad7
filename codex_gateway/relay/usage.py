"""Read token usage from what an upstream sent, and map it to the classes that are billed.

OpenAI's counts nest: cached tokens are part of input tokens, reasoning tokens are part of
output tokens. Chat Completions names the same numbers prompt/completion tokens. Counts that
break those rules are kept as received and flagged; the bill never trusts them blindly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

FLAG_INVALID = "usage_invalid"
FLAG_CACHED_OVER_INPUT = "cached_exceeds_input"
FLAG_REASONING_OVER_OUTPUT = "reasoning_exceeds_output"
FLAG_MISSING = "usage_missing"
# No single request comes near this; a larger count is a broken upstream, not a bill.
MAX_TOKENS = 10**12


class MappedUsage(NamedTuple):
    """Token counts as received, plus the counts the bill is computed from. (A named tuple,
    as the other values made for every request are: immutable, and made several times
    faster than a frozen dataclass.)"""

    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    billable_cached_tokens: int
    flags: tuple[str, ...] = ()

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.billable_cached_tokens

    @property
    def billable(self) -> bool:
        return FLAG_INVALID not in self.flags and FLAG_MISSING not in self.flags


NO_USAGE = MappedUsage(0, 0, 0, 0, 0, (FLAG_MISSING,))


def _count(value: Any) -> int | None:
    """A token count if `value` is an integer from 0 to MAX_TOKENS (JSON `1.0` too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _detail(details: Any, name: str) -> tuple[int, bool]:
    """A nested count; missing or null details mean zero."""
    if details is None:
        return 0, True
    if not isinstance(details, dict):
        return 0, False
    value = details.get(name)
    if value is None:
        return 0, True
    count = _count(value)
    return (count, True) if count is not None else (0, False)


_RESPONSES_NAMES = (
    "input_tokens",
    "input_tokens_details",
    "output_tokens",
    "output_tokens_details",
)
_CHAT_NAMES = (
    "prompt_tokens",
    "prompt_tokens_details",
    "completion_tokens",
    "completion_tokens_details",
)


def _names(usage: dict[str, Any]) -> tuple[str, str, str, str]:
    """The field names a usage object uses: Responses', or Chat Completions'."""
    if "input_tokens" in usage or "output_tokens" in usage:
        return _RESPONSES_NAMES
    return _CHAT_NAMES


def map_usage(usage: Any) -> MappedUsage:
    """Map a Responses or Chat Completions `usage` object; never raises."""
    if not isinstance(usage, dict):
        return NO_USAGE
    names = _names(usage)
    input_tokens = _count(usage.get(names[0]))
    output_tokens = _count(usage.get(names[2]))
    cached, cached_ok = _detail(usage.get(names[1]), "cached_tokens")
    reasoning, reasoning_ok = _detail(usage.get(names[3]), "reasoning_tokens")
    if input_tokens is None or output_tokens is None or not cached_ok or not reasoning_ok:
        return MappedUsage(
            input_tokens or 0, cached, output_tokens or 0, reasoning, 0, (FLAG_INVALID,)
        )
    flags: list[str] = []
    if cached > input_tokens:
        flags.append(FLAG_CACHED_OVER_INPUT)
    if reasoning > output_tokens:
        flags.append(FLAG_REASONING_OVER_OUTPUT)
    return MappedUsage(
        input_tokens,
        cached,
        output_tokens,
        reasoning,
        min(cached, input_tokens),
        tuple(flags),
    )


def with_estimate(usage: Any, estimate: dict[str, Any]) -> dict[str, Any]:
    """`usage` as reported, as a Responses usage object, with each side whose counts cannot
    be read taken from `estimate` instead: input with its cached count, output with its
    reasoning count, so that each side's nesting holds."""
    merged = dict(estimate)
    if not isinstance(usage, dict):
        return merged
    names = _names(usage)
    input_tokens = _count(usage.get(names[0]))
    cached, cached_ok = _detail(usage.get(names[1]), "cached_tokens")
    if input_tokens is not None and cached_ok:
        merged["input_tokens"] = input_tokens
        merged["input_tokens_details"] = {"cached_tokens": cached}
    output_tokens = _count(usage.get(names[2]))
    reasoning, reasoning_ok = _detail(usage.get(names[3]), "reasoning_tokens")
    if output_tokens is not None and reasoning_ok:
        merged["output_tokens"] = output_tokens
        merged["output_tokens_details"] = {"reasoning_tokens": reasoning}
    merged["total_tokens"] = merged["input_tokens"] + merged["output_tokens"]
    return merged


def usage_from_terminal(event: dict[str, Any] | None) -> Any:
    """The raw `usage` of a terminal event (`response.*` carries it inside `response`)."""
    if not event:
        return None
    response = event.get("response")
    if isinstance(response, dict):
        return response.get("usage")
    return event.get("usage")


def upstream_model_of(document: dict[str, Any] | None) -> str | None:
    """The model an upstream says it used, from a terminal event or a response body."""
    if not document:
        return None
    response = document.get("response", document)
    model = response.get("model") if isinstance(response, dict) else None
    return model if isinstance(model, str) else None


def response_id_of(document: dict[str, Any] | None) -> str | None:
    if not document:
        return None
    response = document.get("response", document)
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) else None
