"""What the test server refuses, and the error bodies it answers with.

Strict validation (:func:`validate`) refuses what OpenAI refuses, in OpenAI's
words. The texts are copied from what the real servers answer (as reported in
public bug reports quoting them): OpenAI's validation and context-length
messages, llama.cpp's ``llama-server`` and ``llama-cpp-python``'s overflow
messages, Azure OpenAI's ``{"code", "message"}`` errors. The spelling
"preceeding" is OpenAI's own. Pure: no sockets, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AZURE_NOT_FOUND",
    "AZURE_NO_DEPLOYMENT",
    "Invalid",
    "azure_status_body",
    "error_body",
    "llama_cpp_python_context_body",
    "llamacpp_context_body",
    "openai_context_body",
    "status_body",
    "validate",
]


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why strict mode refuses a request: OpenAI's 400 body parts."""

    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code)


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _missing(param: str) -> Invalid:
    return Invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _check_content(message: Mapping[str, Any], i: int, *, optional: bool) -> Invalid | None:
    if "content" not in message:
        return None if optional else _missing(f"messages[{i}].content")
    content = message["content"]
    if content is None:
        if optional:
            return None
        return Invalid(
            "Invalid value for 'content': expected a string, got null.",
            f"messages.[{i}].content",
        )
    if not isinstance(content, str | list):
        return Invalid(
            f"Invalid type for 'messages[{i}].content': expected one of a string or array "
            f"of objects, but got {_json_type(content)} instead.",
            f"messages[{i}].content",
            "invalid_type",
        )
    return None


def validate(body: Any) -> Invalid | None:
    """What OpenAI would refuse in a chat request body, or None if it would accept it."""
    if not isinstance(body, Mapping):
        return Invalid(
            f"Invalid type for request body: expected an object, but got {_json_type(body)}"
            " instead.",
            None,
            "invalid_type",
        )
    if not body.get("model"):
        return Invalid("you must provide a model parameter")
    if "messages" not in body:
        return _missing("messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        return Invalid(
            f"Invalid type for 'messages': expected an array, but got {_json_type(messages)}"
            " instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        return Invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        problem = _check_message(message, i)
        if problem:
            return problem
    return _check_tool_pairing(messages)


def _check_message(message: Any, i: int) -> Invalid | None:
    if not isinstance(message, Mapping):
        return Invalid(
            f"Invalid type for 'messages[{i}]': expected an object, but got "
            f"{_json_type(message)} instead.",
            f"messages[{i}]",
            "invalid_type",
        )
    if "role" not in message:
        return _missing(f"messages[{i}].role")
    role = message["role"]
    if role not in _ROLES:
        return Invalid(
            f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', "
            "'function', 'tool', and 'developer'.",
            f"messages[{i}].role",
            "invalid_value",
        )
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not calls:
                return Invalid(
                    f"Invalid 'messages[{i}].tool_calls': empty array. Expected an array "
                    "with minimum length 1, but got an empty array instead.",
                    f"messages[{i}].tool_calls",
                    "empty_array",
                )
            for j, call in enumerate(calls):
                problem = _check_call(call, i, j)
                if problem:
                    return problem
        has_call = bool(calls) or bool(message.get("function_call"))
        return _check_content(message, i, optional=has_call)
    if role == "tool" and not message.get("tool_call_id"):
        return _missing(f"messages[{i}].tool_call_id")
    return _check_content(message, i, optional=False)


def _check_call(call: Any, i: int, j: int) -> Invalid | None:
    where = f"messages[{i}].tool_calls[{j}]"
    if not isinstance(call, Mapping):
        return Invalid(
            f"Invalid type for '{where}': expected an object, but got {_json_type(call)} instead.",
            where,
            "invalid_type",
        )
    if not call.get("id"):
        return _missing(f"{where}.id")
    if "type" not in call:
        return _missing(f"{where}.type")
    function = call.get("function")
    if not isinstance(function, Mapping):
        return _missing(f"{where}.function")
    if "name" not in function:
        return _missing(f"{where}.function.name")
    if "arguments" not in function:
        return _missing(f"{where}.function.arguments")
    return None


def _check_tool_pairing(messages: list[Any]) -> Invalid | None:
    """Every tool result answers the assistant just before it; every call gets its answer."""
    pending: list[str] = []
    answerable: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in answerable:
                return Invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            if call_id in pending:
                pending.remove(call_id)
            continue
        if pending:
            return _unanswered(pending, i)
        answerable = set()
        if role == "assistant" and message.get("tool_calls"):
            pending = [str(call["id"]) for call in message["tool_calls"]]
            answerable = set(pending)
    if pending:
        return _unanswered(pending, len(messages))
    return None


def _unanswered(pending: list[str], i: int) -> Invalid:
    return Invalid(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(pending),
        f"messages.[{i}].role",
    )


def openai_context_body(window: int, prompt: int, completion: int) -> dict[str, Any]:
    """OpenAI's context-length 400 (two wordings: messages alone, or with the completion)."""
    if prompt > window or not completion:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return error_body(message, param="messages", code="context_length_exceeded")


def llamacpp_context_body(window: int, prompt: int) -> dict[str, Any]:
    """llama.cpp ``llama-server``'s overflow 400 (it counts the prompt only)."""
    return {
        "error": {
            "code": 400,
            "message": f"request ({prompt} tokens) exceeds the available context size "
            f"({window} tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt,
            "n_ctx": window,
        }
    }


def llama_cpp_python_context_body(
    window: int, prompt: int, max_tokens: int | None
) -> dict[str, Any]:
    """``llama-cpp-python``'s server overflow 400 (it prints ``None`` for an unset max)."""
    message = (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + (max_tokens or 0)} tokens ({prompt} in the messages, {max_tokens} in the "
        "completion). Please reduce the length of the messages or completion."
    )
    return error_body(message, param="messages", code="context_length_exceeded")


def _masked(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def status_body(code: int, *, model: str, api_key: str) -> tuple[str, bytes]:
    """OpenAI's body for an HTTP error ``code``: (content type, bytes)."""
    if code == 502:
        page = (
            "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
            "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
            "</body>\r\n</html>\r\n"
        )
        return "text/html", page.encode()
    body: dict[str, Any]
    if code == 401:
        body = error_body(
            f"Incorrect API key provided: {_masked(api_key)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    elif code == 403:
        body = error_body(
            "Country, region, or territory not supported",
            type="request_forbidden",
            code="unsupported_country_region_territory",
        )
    elif code == 404:
        body = error_body(
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    elif code == 429:
        body = error_body(
            f"Rate limit reached for {model} in organization org-test on tokens per min (TPM): "
            "Limit 10000, Used 10000, Requested 100. Please try again in 600ms. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            type="tokens",
            param=None,
            code="rate_limit_exceeded",
        )
    elif code == 503:
        body = error_body(
            "The engine is currently overloaded, please try again later.", type="server_error"
        )
    elif code >= 500:
        body = error_body(
            "The server had an error while processing your request. Sorry about that!",
            type="server_error",
        )
    else:
        reasons = {
            400: "Bad request.",
            408: "Request timed out.",
            409: "The request conflicts with the current state of the resource.",
            422: "The request could not be processed.",
        }
        body = error_body(reasons.get(code, f"HTTP {code}"))
    return "application/json", json.dumps(body).encode()


def azure_error(code: str, message: str) -> dict[str, Any]:
    """Azure OpenAI's error envelope: a string ``code`` and a ``message``, nothing else."""
    return {"error": {"code": code, "message": message}}


def azure_status_body(code: int, *, api_version: str) -> dict[str, Any] | None:
    """Azure's body for an HTTP error ``code`` where it differs from OpenAI's, else None."""
    if code == 401:
        return azure_error(
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
            "provide a valid key for an active subscription and use a correct regional API "
            "endpoint for your resource.",
        )
    if code == 429:
        return azure_error(
            "429",
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
            f"{api_version} have exceeded token rate limit of your current OpenAI S0 pricing "
            "tier. Please retry after 1 second. Please go here: https://aka.ms/oai/quotaincrease "
            "if you would like to further increase the default rate limit.",
        )
    return None


AZURE_NOT_FOUND = azure_error("404", "Resource not found")
"""What Azure answers a request without ``api-version`` (or to a path it doesn't serve)."""

AZURE_NO_DEPLOYMENT = azure_error(
    "DeploymentNotFound",
    "The API deployment for this resource does not exist. If you created the deployment "
    "within the last 5 minutes, please wait a moment and try again.",
)
