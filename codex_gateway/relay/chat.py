"""Chat Completions on top of the Responses API, both ways, without I/O.

Codex models are served only through Responses, so a Chat Completions request is translated
into a Responses request, and what comes back (a stream of Responses events, or one response
object) is translated into `chat.completion.chunk`s or one `chat.completion`. Billing never
reads the translated output: it reads the upstream's own events, exactly as on /v1/responses.
The usage a client is told is the counts its request is billed by, mapped as the bill maps
them; where the upstream's own usage cannot be billed, those are known only once the gateway
has made its estimate, so a stream's usage chunk waits for it (`ChatStreamTranslator.finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from codex_gateway.errors import InvalidRequest, UpstreamProtocolError
from codex_gateway.relay.redaction import redact_json
from codex_gateway.relay.shaping import check_output_cap, messages_to_input, parse_json_object
from codex_gateway.relay.sse import TERMINAL_STATUS
from codex_gateway.relay.usage import MappedUsage, map_usage

DONE = b"data: [DONE]\n\n"

# Chat parameters that mean the same on Responses and go across unchanged.
_PASSED = (
    "temperature",
    "top_p",
    "user",
    "metadata",
    "service_tier",
    "store",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "top_logprobs",
)
# Chat parameters the gateway translates itself.
_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "max_tokens",
        "max_completion_tokens",
        "reasoning_effort",
        "response_format",
        "verbosity",
    }
)
# Chat parameters Responses has no equivalent for, with the value that asks for nothing.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda value: value in (None, 1),
    "stop": lambda value: value in (None, [], ""),
    "logprobs": lambda value: value in (None, False),
    "presence_penalty": lambda value: value in (None, 0),
    "frequency_penalty": lambda value: value in (None, 0),
    "logit_bias": lambda value: value in (None, {}),
    "seed": lambda value: value is None,
    "modalities": lambda value: value in (None, ["text"]),
    "audio": lambda value: value is None,
    "prediction": lambda value: value is None,
    "functions": lambda value: value in (None, []),
    "function_call": lambda value: value is None,
    "web_search_options": lambda value: value is None,
}
_FINISH_BY_INCOMPLETE_REASON = {"max_output_tokens": "length", "content_filter": "content_filter"}


@dataclass(frozen=True)
class ChatRequest:
    """A Chat Completions request and the Responses request that serves it."""

    model: str
    stream: bool
    include_usage: bool
    responses: dict[str, Any]

    def responses_body(self) -> bytes:
        return orjson.dumps(self.responses)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Check a Chat Completions body and translate it; bad input names the field at fault."""
    document = parse_json_object(raw)
    model = document.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("You must provide a model parameter.", param="model")
    stream = document.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("The stream parameter must be true or false.", param="stream")
    _refuse_unsupported(document)
    # Chat Completions keeps nothing unless asked; Responses keeps everything unless told not to
    responses: dict[str, Any] = {"model": model, "input": _input(document), "store": False}
    responses.update({name: document[name] for name in _PASSED if name in document})
    _translate_tools(document, responses)
    _translate_limits(document, responses)
    _translate_text(document, responses)
    responses["stream"] = stream
    return ChatRequest(model, stream, stream and _include_usage(document), responses)


def _refuse_unsupported(document: dict[str, Any]) -> None:
    """Refuse every argument that cannot be honoured, naming them all at once."""
    asked = [name for name in document if name not in _TRANSLATED and name not in _PASSED]
    unknown = [name for name in asked if name not in _NEUTRAL]
    if unknown:
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {', '.join(unknown)}.", param=unknown[0]
        )
    refused = [name for name in asked if not _NEUTRAL[name](document[name])]
    if refused:
        verb, pronoun = ("is", "it") if len(refused) == 1 else ("are", "them")
        raise InvalidRequest(
            f"{', '.join(refused)} {verb} not supported for this model: Codex models answer "
            f"through the Responses API, which has no equivalent. Leave {pronoun} out.",
            param=refused[0],
        )


def _input(document: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in document:
        raise InvalidRequest("You must provide a messages parameter.", param="messages")
    items = messages_to_input(document["messages"])
    _check_tool_results(items)
    return items


def _check_tool_results(items: list[dict[str, Any]]) -> None:
    """Every tool result must answer a tool call made earlier, as the upstream requires."""
    called: set[str] = set()
    for item in items:
        if item.get("type") == "function_call":
            called.add(item["call_id"])
        elif item.get("type") == "function_call_output" and item["call_id"] not in called:
            raise InvalidRequest(
                f"The tool message with tool_call_id {item['call_id']!r} does not answer any "
                "tool call in an earlier assistant message.",
                param="messages",
            )


def _translate_tools(document: dict[str, Any], responses: dict[str, Any]) -> None:
    tools = document.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be an array.", param="tools")
        responses["tools"] = [_tool(tool, index) for index, tool in enumerate(tools)]
    choice = document.get("tool_choice")
    if choice is not None:
        responses["tool_choice"] = _tool_choice(choice)


def _tool(tool: Any, index: int) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind not in ("function", "custom") or not isinstance(tool.get(kind), dict):
        raise InvalidRequest(
            f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}} "
            "or {'type': 'custom', 'custom': {...}}.",
            param=f"tools[{index}]",
        )
    definition = tool[kind]
    if not isinstance(definition.get("name"), str) or not definition["name"]:
        raise InvalidRequest(
            f"tools[{index}].{kind}.name must be a non-empty string.",
            param=f"tools[{index}].{kind}.name",
        )
    return {"type": kind, **definition}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        named = choice.get(choice["type"])
        if isinstance(named, dict) and isinstance(named.get("name"), str):
            return {"type": choice["type"], "name": named["name"]}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        if isinstance(allowed, dict) and isinstance(allowed.get("tools"), list):
            return {
                "type": "allowed_tools",
                "mode": allowed.get("mode", "auto"),
                "tools": [_allowed_tool(tool) for tool in allowed["tools"]],
            }
    raise InvalidRequest(
        "tool_choice must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}.",
        param="tool_choice",
    )


def _allowed_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and isinstance(tool.get(tool.get("type", "")), dict):
        return {"type": tool["type"], "name": tool[tool["type"]].get("name")}
    return tool


def _translate_limits(document: dict[str, Any], responses: dict[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        value = document.get(name)
        check_output_cap(value, name)
        if value is not None:
            responses["max_output_tokens"] = value
    effort = document.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise InvalidRequest("reasoning_effort must be a string.", param="reasoning_effort")
        responses["reasoning"] = {"effort": effort}


def _translate_text(document: dict[str, Any], responses: dict[str, Any]) -> None:
    text: dict[str, Any] = {}
    response_format = document.get("response_format")
    if response_format is not None:
        text["format"] = _text_format(response_format)
    if document.get("verbosity") is not None:
        text["verbosity"] = document["verbosity"]
    if text:
        responses["text"] = text


def _text_format(response_format: Any) -> dict[str, Any]:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return {"type": "json_schema", **response_format["json_schema"]}
    raise InvalidRequest(
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {...}}.",
        param="response_format",
    )


def _include_usage(document: dict[str, Any]) -> bool:
    options = document.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object.", param="stream_options")
    return options.get("include_usage") is True


# -- what comes back ----------------------------------------------------------------------


def chat_usage(usage: MappedUsage) -> dict[str, Any]:
    """Billed counts in Chat Completions names, the nesting kept: the cached tokens billed
    (never more than the prompt) are part of the prompt, reasoning tokens part of the
    completion, and the total is prompt plus completion, whatever total the upstream sent."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.billable_cached_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_id(response_id: Any) -> str:
    """The chat completion id for a response id: the same suffix, so the two can be matched."""
    if not isinstance(response_id, str) or not response_id:
        return "chatcmpl-unknown"
    return "chatcmpl-" + response_id.removeprefix("resp_")


def error_payload(
    error: Any, fallback_code: str = "upstream_error", known: Sequence[str] = ()
) -> dict[str, Any]:
    """OpenAI's error shape from an `error` event, a failed response's `error`, or a 429 body,
    without the `known` secrets or any other in any of its fields."""
    nested = error.get("error") if isinstance(error, dict) else None
    source = nested if isinstance(nested, dict) else error if isinstance(error, dict) else {}
    message = source.get("message")
    code = source.get("code") or source.get("type") or fallback_code
    payload = {
        "message": message if isinstance(message, str) and message else "The upstream failed.",
        "type": source.get("type") if isinstance(source.get("type"), str) else "upstream_error",
        "param": source.get("param"),
        "code": code,
    }
    return {"error": redact_json(payload, known)}


def finish_reason(response: dict[str, Any], made_tool_calls: bool) -> str:
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return _FINISH_BY_INCOMPLETE_REASON.get(str(reason), "length")
    return "tool_calls" if made_tool_calls else "stop"


class ChatStreamTranslator:
    """Turns Responses stream events, one at a time, into Chat Completions SSE lines.

    Each chunk is written from a prefix built once per stream, so a text delta costs one JSON
    string encoding. The stream always ends with `data: [DONE]`, after a finish chunk, an
    optional usage chunk, or an error chunk when the upstream failed or went quiet. A final
    event whose usage cannot be billed as it came leaves the usage chunk and `[DONE]` to
    `finish`, given the counts billed instead (`awaits_usage`).
    """

    __slots__ = (
        "_awaits_usage",
        "_created",
        "_finished",
        "_include_usage",
        "_known",
        "_model",
        "_prefix",
        "_response_id",
        "_role_sent",
        "_service_tier",
        "_tools",
    )

    def __init__(
        self, model: str, include_usage: bool, created: int = 0, known: Sequence[str] = ()
    ):
        self._model = model
        # Secrets an upstream's error may quote, taken out of the error chunk.
        self._known = known
        self._include_usage = include_usage
        self._created = created
        self._response_id: str | None = None
        self._service_tier: Any = None
        self._prefix: bytes | None = None
        self._role_sent = False
        self._finished = False
        self._awaits_usage = False
        # item id -> [tool_calls index, arguments streamed so far]
        self._tools: dict[str, list[Any]] = {}

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def awaits_usage(self) -> bool:
        """Whether the answer is finished but its usage chunk waits for the counts billed."""
        return self._awaits_usage

    @property
    def ended(self) -> bool:
        """Whether the lines given so far end with `[DONE]`: once they are written, the
        client has its whole answer."""
        return self._finished and not self._awaits_usage

    def feed(self, event: dict[str, Any]) -> list[bytes]:
        if self._finished:
            return []
        handler = _HANDLERS.get(str(event.get("type")))
        return handler(self, event) if handler is not None else []

    def finish(self, usage: MappedUsage | None = None) -> list[bytes]:
        """The upstream closed. A stream that awaits its usage ends with the usage chunk of
        `usage`, the counts billed (none when nothing is), and `[DONE]`; one that never
        reached its final event ends in an error."""
        if self._awaits_usage:
            self._awaits_usage = False
            return [self._usage_chunk(usage), DONE] if usage is not None else [DONE]
        if self._finished:
            return []
        return self._error(
            {
                "message": "The upstream stream ended before its final event, so this "
                "response is incomplete.",
                "type": "upstream_error",
                "code": "stream_incomplete",
            }
        )

    # -- event handlers ---------------------------------------------------------------------

    def _on_created(self, event: dict[str, Any]) -> list[bytes]:
        response = event.get("response")
        if isinstance(response, dict) and self._prefix is None:
            self._response_id = response.get("id")
            if isinstance(response.get("created_at"), int):
                self._created = response["created_at"]
            if isinstance(response.get("model"), str):
                self._model = response["model"]
            self._service_tier = response.get("service_tier")
        return self._role()

    def _on_text(self, event: dict[str, Any]) -> list[bytes]:
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        return [*self._role(), self._chunk(b'{"content":' + orjson.dumps(delta) + b"}")]

    def _on_refusal(self, event: dict[str, Any]) -> list[bytes]:
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        return [*self._role(), self._chunk(b'{"refusal":' + orjson.dumps(delta) + b"}")]

    def _on_item_added(self, event: dict[str, Any]) -> list[bytes]:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") not in (
            "function_call",
            "custom_tool_call",
        ):
            return []
        return [*self._role(), self._announce(item, "")]

    def _on_arguments(self, event: dict[str, Any]) -> list[bytes]:
        state = self._tools.get(str(event.get("item_id")))
        delta = event.get("delta")
        if state is None or not isinstance(delta, str) or not delta:
            return []
        state[1] += delta
        return [self._chunk(_tool_delta(state[0], {"function": {"arguments": delta}}))]

    def _on_item_done(self, event: dict[str, Any]) -> list[bytes]:
        """Send what the deltas left out: a call never announced, or arguments not streamed."""
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") not in (
            "function_call",
            "custom_tool_call",
        ):
            return []
        arguments = _arguments(item)
        state = self._tools.get(str(item.get("id")))
        if state is None:
            return [*self._role(), self._announce(item, arguments)]
        rest = arguments[len(state[1]) :] if arguments.startswith(state[1]) else ""
        if not rest:
            return []
        state[1] = arguments
        return [self._chunk(_tool_delta(state[0], {"function": {"arguments": rest}}))]

    def _on_terminal(self, event: dict[str, Any]) -> list[bytes]:
        response = event.get("response")
        response = response if isinstance(response, dict) else {}
        if event.get("type") == "response.failed":
            return self._error(response.get("error") or {"message": "The response failed."})
        reason = finish_reason(response, bool(self._tools))
        lines = [*self._role(), self._chunk(b"{}", finish=reason)]
        self._finished = True
        if not self._include_usage:
            return [*lines, DONE]
        usage = map_usage(response.get("usage"))
        if not usage.billable:
            # Billed partly from the gateway's estimate, which is made once the stream ends.
            self._awaits_usage = True
            return lines
        return [*lines, self._usage_chunk(usage), DONE]

    def _on_error(self, event: dict[str, Any]) -> list[bytes]:
        # The event's own `type` is "error"; the error's type is in `error` when nested.
        return self._error({name: value for name, value in event.items() if name != "type"})

    # -- chunk writing ----------------------------------------------------------------------

    def _announce(self, item: dict[str, Any], arguments: str) -> bytes:
        index = len(self._tools)
        self._tools[str(item.get("id"))] = [index, arguments]
        call = {
            "index": index,
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": arguments},
        }
        return self._chunk(b'{"tool_calls":[' + orjson.dumps(call) + b"]}")

    def _role(self) -> list[bytes]:
        if self._role_sent:
            return []
        self._role_sent = True
        return [self._chunk(b'{"role":"assistant","content":""}')]

    def _head(self) -> bytes:
        if self._prefix is None:
            head = {
                "id": completion_id(self._response_id),
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "system_fingerprint": None,
                "service_tier": self._service_tier,
            }
            self._prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":'
        return self._prefix

    def _chunk(self, delta: bytes, finish: str | None = None) -> bytes:
        reason = b"null" if finish is None else b'"' + finish.encode() + b'"'
        return (
            self._head()
            + b'[{"index":0,"delta":'
            + delta
            + b',"logprobs":null,"finish_reason":'
            + reason
            + b'}],"usage":null}\n\n'
        )

    def _usage_chunk(self, usage: MappedUsage) -> bytes:
        return self._head() + b'[],"usage":' + orjson.dumps(chat_usage(usage)) + b"}\n\n"

    def _error(self, error: Any) -> list[bytes]:
        self._finished = True
        payload = error_payload(error, known=self._known)
        return [b"data: " + orjson.dumps(payload) + b"\n\n", DONE]


def _tool_delta(index: int, fields: dict[str, Any]) -> bytes:
    return b'{"tool_calls":[' + orjson.dumps({"index": index, **fields}) + b"]}"


def _arguments(item: dict[str, Any]) -> str:
    value = item.get("arguments") if item.get("type") == "function_call" else item.get("input")
    return value if isinstance(value, str) else ""


_HANDLERS: dict[str, Callable[[ChatStreamTranslator, dict[str, Any]], list[bytes]]] = {
    "response.created": ChatStreamTranslator._on_created,
    "response.in_progress": ChatStreamTranslator._on_created,
    "response.output_text.delta": ChatStreamTranslator._on_text,
    "response.refusal.delta": ChatStreamTranslator._on_refusal,
    "response.output_item.added": ChatStreamTranslator._on_item_added,
    "response.function_call_arguments.delta": ChatStreamTranslator._on_arguments,
    "response.custom_tool_call_input.delta": ChatStreamTranslator._on_arguments,
    "response.output_item.done": ChatStreamTranslator._on_item_done,
    "response.completed": ChatStreamTranslator._on_terminal,
    "response.incomplete": ChatStreamTranslator._on_terminal,
    "response.failed": ChatStreamTranslator._on_terminal,
    "error": ChatStreamTranslator._on_error,
}


# The final event of a response in each final status (an `error` event ends a stream, and
# is no response's status).
_TERMINAL_OF_STATUS = {
    status: name for name, status in TERMINAL_STATUS.items() if name.startswith("response.")
}


def response_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses stream events that carry a whole response object, for a client that
    asked for a stream from an upstream that answered with the object itself: its start, the
    text and refusal of each message, each tool call whole, then its final event, which a
    response without a final status (queued, in progress) has not reached."""
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
    output = response.get("output")
    for index, item in enumerate(output if isinstance(output, list) else ()):
        if not isinstance(item, dict):
            continue
        if item.get("type") in ("function_call", "custom_tool_call"):
            # The translator tells calls apart by their item id, which an answer may lack.
            called = item if item.get("id") else {**item, "id": f"item_{index}"}
            events.append({"type": "response.output_item.done", "item": called})
            continue
        content = item.get("content") if item.get("type") == "message" else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "output_text":
                events.append({"type": "response.output_text.delta", "delta": part.get("text")})
            elif kind == "refusal":
                events.append({"type": "response.refusal.delta", "delta": part.get("refusal")})
    terminal = _TERMINAL_OF_STATUS.get(str(response.get("status")))
    if terminal is not None:
        events.append({"type": terminal, "response": response})
    return events


def chat_completion(
    response: dict[str, Any], model: str, usage: MappedUsage | None, known: Sequence[str] = ()
) -> dict[str, Any]:
    """One `chat.completion` from a final Responses object, with `usage`, the counts billed
    (none when nothing is); a failed response raises."""
    if response.get("status") == "failed":
        payload = error_payload(response.get("error"), known=known)["error"]
        raise UpstreamProtocolError(
            f"The upstream could not complete the response: {payload['message']}",
            code=str(payload["code"]),
        )
    content, refusal, tool_calls = _collect_output(response.get("output"))
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "refusal": refusal,
        "annotations": [],
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    completion: dict[str, Any] = {
        "id": completion_id(response.get("id")),
        "object": "chat.completion",
        "created": response.get("created_at") if isinstance(response.get("created_at"), int) else 0,
        "model": response.get("model") if isinstance(response.get("model"), str) else model,
        "system_fingerprint": None,
        "service_tier": response.get("service_tier"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(response, bool(tool_calls)),
            }
        ],
    }
    if usage is not None:
        completion["usage"] = chat_usage(usage)
    return completion


def _collect_output(output: Any) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    texts: list[str] = []
    refusals: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "refusal":
                    refusals.append(str(part.get("refusal", "")))
        elif item.get("type") in ("function_call", "custom_tool_call"):
            tool_calls.append(
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": _arguments(item)},
                }
            )
    content = "".join(texts) if texts or not tool_calls else None
    return content, "".join(refusals) or None, tool_calls
