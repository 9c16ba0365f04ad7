"""Check a client's Responses request and shape it for the upstream.

A body that already has `input` goes upstream byte for byte. A body with Chat-style
`messages` (as many guides send to /v1/responses) is converted to Responses input items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from codex_gateway.errors import InvalidRequest

MAX_MODEL_LENGTH = 200
# What follows a string that is an object's key: JSON whitespace, then a colon.
_KEY_END = re.compile(rb"[ \t\r\n]*:")

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


@dataclass(frozen=True)
class ResponsesRequest:
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


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
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


def _may_repeat_a_key(document: dict[str, Any], raw: bytes) -> bool:
    """Whether the body could name a top-level key twice; cheap, and never wrong when False.

    The parser keeps the last of two equal keys, while the upstream may read the first, so a
    repeat could pass a check on one value and send another. A key written with escapes could
    hide a repeat from byte search, so such bodies are checked by a full parse; otherwise a
    repeat needs a second occurrence of the key's text followed by a colon.
    """
    if b"\\u" in raw or b"\\/" in raw:
        return True
    for name in document:
        token = orjson.dumps(name)
        at = raw.find(token)
        if at < 0:
            return True
        at = raw.find(token, at + len(token))
        while at >= 0:
            if _KEY_END.match(raw, at + len(token)):
                return True
            at = raw.find(token, at + len(token))
    return False


def _refuse_repeated_keys(raw: bytes) -> None:
    """Parse again keeping the top-level object's pairs (the hook's last call) and refuse a
    body that names one of them twice."""
    pairs: list[tuple[str, Any]] = []

    def keep(found: list[tuple[str, Any]]) -> dict[str, Any]:
        pairs[:] = found
        return dict(found)

    json.loads(raw, object_pairs_hook=keep)
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise InvalidRequest(
                f"The request body names the field `{name}` more than once; send each field once.",
                param=name,
            )
        seen.add(name)


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
    if document.get("input") is None and document.get("previous_response_id") is None:
        raise InvalidRequest(
            "The request has nothing to compact; send the conversation in input.", param="input"
        )
    return ResponsesRequest(model, False, raw, document, False)
