"""The test server's answers as HTTP responses: completion bodies, SSE streams, faults.

Given what the model answers (:mod:`~conversation_memory.testing.replies`)
and what went wrong (:class:`~conversation_memory.testing.Fault`), these
functions build the :class:`~conversation_memory.testing._http.Response` the
socket layer sends: OpenAI's ``chat.completion`` body or its
``chat.completion.chunk`` events (Azure's filter verdicts included when the
request came by Azure's route), a status error in the server's words, or a
context-length 400 in the words of the server it plays, then spoiled as a
transport fault says. Pure: no sockets, no clock but the ``created`` stamp.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conversation_memory.testing import refusals
from conversation_memory.testing._http import Response
from conversation_memory.testing.faults import ContextStyle, Fault
from conversation_memory.testing.replies import Answer, filter_results, filtered_answer
from conversation_memory.testing.tokenizer import completion_tokens

__all__ = [
    "AzureRoute",
    "apply",
    "completion",
    "json_response",
    "not_json",
    "overflow",
    "sse",
    "status",
]

_FINGERPRINT = "fp_convmem_test"
_HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body>Hi</body></html>\n"


@dataclass(frozen=True, slots=True)
class AzureRoute:
    """An Azure request's route: which model serves it, and the API version asked for."""

    served: str
    api_version: str


def json_response(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode())


def sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


def not_json() -> Response:
    """A web page where JSON was expected (``Fault.not_json``)."""
    return Response(200, _HTML_PAGE, "text/html; charset=utf-8")


def status(
    fault: Fault,
    *,
    model: str,
    sent_key: str,
    headers: Mapping[str, str],
    azure: AzureRoute | None,
) -> Response:
    """The answer of a ``Fault.status``: the fault's body, else the server's (or Azure's)
    own words for that status; ``echo_headers`` quotes the request's headers back."""
    code = fault.code or 500
    azure_body = azure and refusals.azure_status_body(code, api_version=azure.api_version)
    if fault.echo_headers:
        quoted = "; ".join(f"{name}: {value}" for name, value in headers.items())
        content_type = "application/json"
        message = f"The upstream refused the request (status {code}). Request headers: {quoted}"
        data = json.dumps(refusals.error_body(message, type="gateway_error")).encode()
    elif fault.body is None and azure_body:
        content_type, data = "application/json", json.dumps(azure_body).encode()
    elif fault.body is None:
        content_type, data = refusals.status_body(code, model=model, api_key=sent_key)
    elif isinstance(fault.body, bytes | str):
        content_type = "text/plain; charset=utf-8"
        data = fault.body.encode() if isinstance(fault.body, str) else fault.body
    else:
        content_type, data = "application/json", json.dumps(fault.body).encode()
    response = Response(code, data, content_type, list(fault.headers))
    if code == 429:
        response.headers += [
            ("x-ratelimit-limit-tokens", "10000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "600ms"),
        ]
    return response


def overflow(style: ContextStyle, window: int, prompt: int, max_tokens: int | None) -> Response:
    """A context-length 400 in the words of the server ``style`` names."""
    if style == "llamacpp":
        return json_response(400, refusals.llamacpp_context_body(window, prompt))
    if style == "llama-cpp-python":
        return json_response(
            400, refusals.llama_cpp_python_context_body(window, prompt, max_tokens)
        )
    return json_response(400, refusals.openai_context_body(window, prompt, max_tokens or 0))


def completion(
    body: Mapping[str, Any],
    answer: Answer,
    prompt: int,
    *,
    number: int,
    model: str,
    fault: Fault | None = None,
    azure: AzureRoute | None = None,
) -> Response:
    """The 200 carrying ``answer`` (reply ``number`` of the server), whole or streamed as
    ``body`` asks; a content-filter fault stops the answer first."""
    filtered: str | None = None
    if fault is not None and fault.kind == "content_filter":
        answer = filtered_answer(answer, fault.after_chunks)
        filtered = fault.category
    tokens = completion_tokens(answer.content, answer.tool_calls)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": tokens,
        "total_tokens": prompt + tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    head = {
        "id": f"chatcmpl-test{number:06d}",
        "created": int(time.time()),
        "model": azure.served if azure else str(body.get("model") or model),
        "system_fingerprint": _FINGERPRINT,
        "service_tier": "default",
    }
    if not body.get("stream"):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": answer.content,
            "refusal": None,
            "annotations": [],
        }
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": answer.finish_reason,
        }
        payload = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        if azure:
            choice["content_filter_results"] = filter_results(filtered)
            payload["prompt_filter_results"] = _prompt_filter_results()
        return json_response(200, payload)
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
    events = _stream_events(
        head,
        answer,
        usage if include_usage else None,
        azure=azure is not None,
        filtered=filtered,
    )
    return Response(
        200,
        content_type="text/event-stream; charset=utf-8",
        events=events,
        finish_index=len(events) - (3 if include_usage else 2),
    )


def apply(response: Response, fault: Fault | None) -> Response:
    """Let a transport fault spoil ``response``."""
    if fault is None:
        return response
    kind = fault.kind
    if kind == "slow_first_byte":
        response.first_byte_delay = fault.seconds
    elif kind == "drip":
        response.chunk_delay = fault.seconds
        response.chunk_bytes = fault.chunk_bytes
    elif kind == "abrupt_close":
        response.close_after = -1 if fault.before_headers else fault.after_chunks
    elif response.status != 200 or kind in ("status", "not_json", "context_length"):
        return response
    elif kind == "cut_stream":
        if response.events is None:
            response.close_after = 0
        else:
            kept = response.events[: min(fault.after_chunks, response.finish_index)]
            response.events = kept
            if fault.done:
                response.events.append(sse("[DONE]"))
    elif kind == "sse_error":
        error = refusals.error_body(fault.message, type="server_error")
        if response.events is None:
            response.body = json.dumps(error).encode()
        else:
            response.events = [
                *response.events[: fault.after_chunks],
                sse(error, event="error"),
            ]
    elif kind == "malformed_json":
        if response.events is None:
            response.body = response.body[: len(response.body) // 2]
        else:
            first = response.events[0]
            response.events = [first[: len(first) // 2] + b"\n\n"]
    return response


def _prompt_filter_results() -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": filter_results()}]


def _stream_events(
    head: Mapping[str, Any],
    answer: Answer,
    usage: Mapping[str, Any] | None,
    *,
    azure: bool = False,
    filtered: str | None = None,
) -> list[bytes]:
    """The SSE events of a streamed answer, ``data: [DONE]`` included.

    Azure's stream opens with a chunk of prompt-filter verdicts and no choices, and each
    choice carries its own verdicts (empty on the role chunk).
    """

    def chunk(delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
        if azure:
            role_chunk = "role" in delta
            caught = filtered if finish == "content_filter" else None
            choice["content_filter_results"] = {} if role_chunk else filter_results(caught)
        data: dict[str, Any] = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if usage is not None:
            data["usage"] = None
        return sse(data)

    events = []
    if azure:
        events.append(
            sse(
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": _prompt_filter_results(),
                }
            )
        )
    events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
    for piece in _pieces(answer.content or ""):
        events.append(chunk({"content": piece}))
    for index, call in enumerate(answer.tool_calls or ()):
        function = call["function"]
        start = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": function["name"], "arguments": ""},
        }
        events.append(chunk({"tool_calls": [start]}))
        arguments = function["arguments"]
        for offset in range(0, len(arguments), 8):
            fragment = {"index": index, "function": {"arguments": arguments[offset : offset + 8]}}
            events.append(chunk({"tool_calls": [fragment]}))
    events.append(chunk({}, answer.finish_reason))
    if usage is not None:
        events.append(
            sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    events.append(sse("[DONE]"))
    return events


def _pieces(text: str) -> list[str]:
    """Split text into stream deltas of about two words each (joined, they are ``text``)."""
    words = text.split(" ")
    pieces = []
    for i in range(0, len(words), 2):
        piece = " ".join(words[i : i + 2])
        pieces.append(piece if i + 2 >= len(words) else piece + " ")
    return [p for p in pieces if p]
