"""Check a client's Responses request and shape it for the upstream.

A body that already has `input` goes upstream byte for byte. A body with Chat-style
`messages` (as many guides send to /v1/responses) is converted to Responses input items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from codex_gateway.errors import InvalidRequest

MAX_MODEL_LENGTH = 200
# The longest path of a repeated key an error shows; a longer one is shown by its end.
MAX_PATH_SHOWN = 200
# The least output cap OpenAI's Responses API accepts (below it answers
# `integer_below_min_value`); Chat requests are served through it too.
MIN_OUTPUT_TOKENS = 16
# How the first bytes of a body that is not JSON text give it away.
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
# A colon written as an escape, which a count of colon bytes misses.
_ESCAPED_COLON = re.compile(rb"\\u003[aA]")

# Client headers that describe the client's own connection or credentials, never forwarded.
_DROPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "authorization",
        "api-key",
        "x-api-key",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "accept-encoding",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "proxy-authorization",
        "cf-connecting-ip",
        "true-client-ip",
        "x-client-ip",
        "via",
        "origin",
        "referer",
        "openai-organization",
        "openai-project",
    }
)


class ResponsesRequest(NamedTuple):
    model: str
    stream: bool
    body: bytes
    document: dict[str, Any]
    converted_messages: bool


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    """Validate the fields the gateway relies on; everything else passes through untouched."""
    document = parse_json_object(raw)
    model = _model(document.get("model"))
    stream = document.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("The stream parameter must be true or false.", param="stream")
    check_output_cap(document.get("max_output_tokens"), "max_output_tokens")
    if "max_tokens" in document:
        # The Responses API refuses it; refused here, it costs no hold and no upstream call.
        raise InvalidRequest(
            "max_tokens is a Chat Completions parameter; on /v1/responses the output cap is "
            "max_output_tokens.",
            param="max_tokens",
        )
    has_input = document.get("input") is not None
    has_messages = document.get("messages") is not None
    if has_input and has_messages:
        raise InvalidRequest(
            "Send either input (Responses) or messages (Chat style), not both.", param="messages"
        )
    if not has_input and not has_messages:
        raise InvalidRequest(
            "The request has neither input nor messages; send the conversation in input.",
            param="input",
        )
    if not has_messages:
        return ResponsesRequest(model, stream, raw, document, False)
    shaped = {name: value for name, value in document.items() if name != "input"}
    shaped["input"] = messages_to_input(shaped.pop("messages"))
    return ResponsesRequest(model, stream, orjson.dumps(shaped), shaped, True)


def _model(model: object) -> str:
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("The model parameter must be a non-empty string.", param="model")
    if len(model) > MAX_MODEL_LENGTH or not model.isprintable():
        raise InvalidRequest(
            f"The model parameter must be at most {MAX_MODEL_LENGTH} printable characters.",
            param="model",
        )
    return model


def check_output_cap(value: object, name: str) -> None:
    """Refuse an output cap the upstream would refuse, before anything is held or sent: a
    value that is not an integer, or one below the least the upstream takes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(
            f"{name} must be an integer number of tokens, not {_json_kind(value)}.",
            param=name,
            code="invalid_type",
        )
    if value < MIN_OUTPUT_TOKENS:
        raise InvalidRequest(
            f"{name} must be at least {MIN_OUTPUT_TOKENS}, the least output the Responses API "
            f"accepts, not {value}.",
            param=name,
            code="integer_below_min_value",
        )


def _json_kind(value: object) -> str:
    """What a JSON value is, for a message that must not echo a value of any size."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        # The parser reads a whole number too large for 64 bits as a float.
        return "a number too large for one" if abs(value) >= 2**64 else "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def parse_json_object(raw: bytes) -> dict[str, Any]:
    _refuse_undecodable(raw)
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in str(exc):
            raise InvalidRequest("The request body is not valid UTF-8 text.") from None
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _may_repeat_a_key(document, raw):
        _refuse_repeated_keys(raw)
    return document


def _refuse_undecodable(raw: bytes) -> None:
    """Name the two kinds of body that are bytes of something other than JSON text, which
    would otherwise be reported as text that is not UTF-8."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    if raw.startswith(GZIP_MAGIC):
        raise InvalidRequest(
            "The request body is gzip-compressed; the gateway does not accept compressed "
            "request bodies, so send the JSON uncompressed and without Content-Encoding."
        )
    if raw.startswith(UTF8_BOM):
        # JSON sent over a network must not start with one (RFC 8259), and the body goes
        # upstream byte for byte, so it is named rather than silently removed.
        raise InvalidRequest(
            "The request body starts with a UTF-8 byte-order mark (EF BB BF); "
            "send the JSON text without it."
        )


def _may_repeat_a_key(document: dict[str, Any], raw: bytes) -> bool:
    """Whether some object in the body could name a key twice; cheap, and never wrong when
    False.

    The parser keeps the last of two equal keys, while the upstream may read the first, so a
    repeat could pass a check on one value and send another. Outside strings a colon only
    ends a key, and the document written back out has one colon per key it kept and the
    same colons inside strings, so the body has more colons when an object repeats a key,
    unless it spells colons inside strings as escapes, which evens the count out.
    """
    try:
        kept = orjson.dumps(document)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: check the slow way
        return True
    if kept == raw:  # most clients write compact JSON just as orjson does
        return False
    if raw.count(b":") != kept.count(b":"):
        return True
    return _ESCAPED_COLON.search(raw) is not None


class _RepeatedKey:
    """Stands, in the checking parse, for an object that names `name` twice."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _refuse_repeated_keys(raw: bytes) -> None:
    """Parse again keeping each object's pairs, and refuse a body in which any object names
    a key twice, naming the first such key by its path (`input[0].content[1].image_url`)."""
    try:
        document = json.loads(raw, object_pairs_hook=_object_or_repeat)
    except RecursionError:
        raise InvalidRequest(
            "The request body nests objects and arrays too deeply for the gateway to check it."
        ) from None
    path = _repeated_key_path(document)
    if path is not None:
        if len(path) > MAX_PATH_SHOWN:  # a huge key or a deep path: its end says enough
            path = "…" + path[-(MAX_PATH_SHOWN - 1) :]
        raise InvalidRequest(
            f"The request body names the field `{path}` more than once; send each field once.",
            param=path,
        )


def _object_or_repeat(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _RepeatedKey:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            return _RepeatedKey(name)
        seen.add(name)
    raise AssertionError("unreachable: fewer keys than pairs means a repeat")


def _repeated_key_path(document: Any) -> str | None:
    """The path of the first repeated key in document order, walking without recursion
    (the body may nest as deep as the parser allows)."""
    pending: list[tuple[Any, str]] = [(document, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, _RepeatedKey):
            return f"{path}.{node.name}" if path else node.name
        if isinstance(node, dict):
            children = [(value, f"{path}.{name}" if path else name) for name, value in node.items()]
        elif isinstance(node, list):
            children = [(value, f"{path}[{index}]") for index, value in enumerate(node)]
        else:
            continue
        pending.extend(reversed(children))
    return None


def messages_to_input(messages: Any) -> list[dict[str, Any]]:
    """Convert Chat Completions messages to Responses input items, keeping their order."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array.", param="messages")
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(
                f"messages[{index}] must be an object.", param=f"messages[{index}]"
            )
        items.extend(_message_items(message, index))
    return items


def _message_items(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        return [_message("developer", _parts(content, "input_text", index))]
    if role == "user":
        return [_message("user", _parts(content, "input_text", index))]
    if role == "assistant":
        items = []
        if content not in (None, "", []):
            items.append(_message("assistant", _parts(content, "output_text", index)))
        items.extend(_tool_call_items(message.get("tool_calls"), index))
        return items
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(
                f"messages[{index}] has role tool but no tool_call_id.",
                param=f"messages[{index}].tool_call_id",
            )
        return [{"type": "function_call_output", "call_id": call_id, "output": _text(content)}]
    raise InvalidRequest(
        f"messages[{index}].role must be system, developer, user, assistant or tool, not {role!r}.",
        param=f"messages[{index}].role",
    )


def _message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


def _parts(content: Any, text_type: str, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": text_type, "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"messages[{index}].content must be a string or an array of parts.",
            param=f"messages[{index}].content",
        )
    return [_part(part, text_type, index) for part in content]


def _part(part: Any, text_type: str, index: int) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest(
            f"messages[{index}].content parts must be objects.", param=f"messages[{index}].content"
        )
    kind = part.get("type")
    if kind == "text":
        return {"type": text_type, "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        converted: dict[str, Any] = {"type": "input_image", "image_url": url}
        if isinstance(image, dict) and image.get("detail"):
            converted["detail"] = image["detail"]
        else:
            converted["detail"] = "auto"
        return converted
    return part


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _tool_call_items(tool_calls: Any, index: int) -> list[dict[str, Any]]:
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise InvalidRequest(
            f"messages[{index}].tool_calls must be an array.",
            param=f"messages[{index}].tool_calls",
        )
    items = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequest(
                f"messages[{index}].tool_calls entries must be objects with a function object.",
                param=f"messages[{index}].tool_calls",
            )
        items.append(
            {
                "type": "function_call",
                "call_id": call.get("id", "") if isinstance(call, dict) else "",
                "name": function.get("name", ""),
                "arguments": function.get("arguments", ""),
            }
        )
    return items


def forward_headers(client_headers: Mapping[str, str], api_key: str) -> dict[str, str]:
    """The client's headers as an OpenAI-API upstream gets them: its own credentials, and
    whatever describes the client's connection, replaced by the account's key."""
    headers = {
        name: value for name, value in client_headers.items() if name not in _DROPPED_HEADERS
    }
    headers["authorization"] = "Bearer " + api_key
    headers["content-type"] = "application/json"
    return headers


def parse_compact_request(raw: bytes) -> ResponsesRequest:
    """A `/v1/responses/compact` body: a model and the conversation to compact, never streamed."""
    document = parse_json_object(raw)
    model = _model(document.get("model"))
    if document.get("stream") not in (None, False):
        raise InvalidRequest(
            "Compaction answers with one JSON object and cannot be streamed; leave stream out.",
            param="stream",
        )
    check_output_cap(document.get("max_output_tokens"), "max_output_tokens")
    if document.get("input") is None and document.get("previous_response_id") is None:
        raise InvalidRequest(
            "The request has nothing to compact; send the conversation in input.", param="input"
        )
    return ResponsesRequest(model, False, raw, document, False)
