"""The test server's model: its tokenizer, its rules, its replies and its bodies.

Everything here is pure (no sockets, no clock), so the HTTP layer in
:mod:`~conversation_memory.testing.server` only decides *when* bytes go out.

**Tokenizer.** Deliberately not tiktoken, so that calibration against a
server's reported ``usage`` is exercised::

    text tokens   = ceil(utf-8 bytes / 3)
    message       = 4 + text(content) + text(name) + text(tool_call_id)
                      + text(compact JSON of tool_calls)
    prompt        = 2 (priming) + sum(messages) + text(compact JSON of tools)
    completion    = text(reply content) + text(compact JSON of reply tool_calls)

Content given as parts counts each text part's text and any other part's
compact JSON. "Compact JSON" is ``json.dumps(..., separators=(",", ":"),
ensure_ascii=False)``.

**Error texts.** Copied from what the real servers answer (as reported in
public bug reports quoting them): OpenAI's validation and context-length
messages, llama.cpp's ``llama-server`` and ``llama-cpp-python``'s overflow
messages, Azure OpenAI's ``{"code", "message"}`` errors. The spelling
"preceeding" is OpenAI's own.

**Azure's content filter.** Azure OpenAI adds ``prompt_filter_results`` to a
reply (the first chunk of a stream, with no choices) and
``content_filter_results`` to each choice, one verdict per category; a reply
its filter stopped ends with ``finish_reason: "content_filter"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PER_MESSAGE",
    "PRIMING",
    "Answer",
    "Invalid",
    "ReplySpec",
    "completion_tokens",
    "count_text",
    "count_tokens",
    "default_reply",
    "default_summary",
    "is_summarization",
    "summarize",
    "validate",
]

PER_MESSAGE = 4
PRIMING = 2

ReplySpec = (
    str | Mapping[str, Any] | Callable[[dict[str, Any]], str | Mapping[str, Any] | None] | None
)
"""What ``ChatServer(reply=...)`` accepts: fixed text, a fixed reply dict, or a function
of the request body returning either (or None to fall back to the default)."""


# --------------------------------------------------------------------------- tokenizer


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def count_text(text: str) -> int:
    """Tokens of one string: ceil(utf-8 bytes / 3)."""
    return -(-len(text.encode("utf-8")) // 3)


def _content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                total += count_text(str(part.get("text", "")))
            else:
                total += count_text(compact(part))
        return total
    return count_text(compact(content))


def count_tokens(messages: Sequence[Mapping[str, Any]], *, tools: Any = None) -> int:
    """Prompt tokens of ``messages`` (and ``tools``) by the server's own tokenizer."""
    total = PRIMING
    for message in messages:
        total += PER_MESSAGE
        if not isinstance(message, Mapping):
            total += count_text(compact(message))
            continue
        total += _content_tokens(message.get("content"))
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                total += count_text(message[key])
        if message.get("tool_calls"):
            total += count_text(compact(message["tool_calls"]))
        if message.get("function_call"):
            total += count_text(compact(message["function_call"]))
    if tools:
        total += count_text(compact(tools))
    return total


def completion_tokens(content: str | None, tool_calls: list[dict[str, Any]] | None) -> int:
    """Tokens of a reply, as reported in ``usage.completion_tokens``."""
    total = count_text(content) if content else 0
    if tool_calls:
        total += count_text(compact(tool_calls))
    return total


def truncate_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix of ``text`` that is at most ``tokens`` tokens."""
    data = text.encode("utf-8")[: max(tokens, 0) * 3]
    return data.decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- errors


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

FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def filter_results(filtered: str | None = None) -> dict[str, Any]:
    """Azure's per-category verdicts: all safe, or ``filtered`` caught."""
    return {
        category: {"filtered": True, "severity": "high"}
        if category == filtered
        else {"filtered": False, "severity": "safe"}
        for category in FILTER_CATEGORIES
    }


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Answer:
    """The assistant turn the server sends back."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def _last(messages: Any, roles: tuple[str, ...]) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") in roles:
            return text_of(message.get("content"))
    return None


def is_summarization(body: Mapping[str, Any]) -> bool:
    """A request whose system/developer message mentions summar(y/ize/ies)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, Mapping)
        and m.get("role") in ("system", "developer")
        and "summar" in text_of(m.get("content")).casefold()
        for m in messages
    )


def default_reply(body: Mapping[str, Any], n: int) -> str:
    """``Reply #<n> to: <first 40 characters of the last user message>``."""
    last = _last(body.get("messages"), ("user",))
    return f"Reply #{n} to: {(last or '(nothing)')[:40]}"


_WORD = re.compile(r"[^\W_][\w'\u2019-]*")
_BLOCK = re.compile(r"<(transcript[-\w]*)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)
_PREVIOUS = re.compile(r"summary:\s*(.*?)(?:\n\s*\n|$)", re.IGNORECASE | re.DOTALL)
_STOP = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "does", "did"),
        *("for", "from", "had", "has", "have", "he", "her", "his", "how", "i", "if", "in"),
        *("is", "it", "its", "me", "my", "no", "not", "of", "ok", "okay", "on", "or", "our"),
        *("please", "she", "so", "that", "the", "their", "them", "then", "there", "these"),
        *("they", "this", "to", "was", "we", "were", "what", "when", "where", "which", "who"),
        *("why", "will", "with", "yes", "you", "your", "hello", "hi", "thanks", "thank"),
        *("sure", "nice", "great", "good", "well", "oh", "none"),
        # words of the summarization prompt and transcript, not of the conversation
        *("summary", "previous", "new", "write", "user", "assistant", "system", "tool"),
        "developer",
    }
)
_MAX_FACTS = 24


def _summary_source(text: str) -> str:
    """The transcript (and previous summary) inside a summarization prompt, or all of it."""
    block = _BLOCK.search(text)
    if not block:
        return text
    before = text[: block.start()]
    previous = _PREVIOUS.search(before)
    return f"{previous.group(1) if previous else ''}\n{block.group(2)}"


def default_summary(body: Mapping[str, Any], max_tokens: int | None) -> str:
    """The summary the server answers a summarization request with (see :func:`summarize`)."""
    return summarize(_summary_source(_last(body.get("messages"), ("user",)) or ""), max_tokens)


def summarize(source: str, max_tokens: int | None) -> str:
    """``Summary: Alice, Paris, 42.``: the distinct capitalized words and numbers, in order.

    Keeps the oldest facts when the cap forces a cut; never empty, never over
    ``max_tokens`` (by this module's tokenizer).
    """
    facts: list[str] = []
    seen: set[str] = set()
    words = [w.group().strip("'\u2019-") for w in _WORD.finditer(source)]
    for word in words:
        if not word or word.casefold() in _STOP or word.casefold() in seen:
            continue
        if word[0].isupper() or word[0].isdigit():
            seen.add(word.casefold())
            facts.append(word)
            if len(facts) == _MAX_FACTS:
                break
    if not facts:
        facts = [w for w in words if w.casefold() not in _STOP][:8] or ["nothing to note"]
    text = f"Summary: {', '.join(facts)}."
    if max_tokens is None:
        return text
    while len(facts) > 1 and count_text(text) > max_tokens:
        facts.pop()
        text = f"Summary: {', '.join(facts)}."
    if count_text(text) > max_tokens:
        text = truncate_to_tokens(text, max_tokens) or text[0]
    return text


def normalize_answer(value: Any, n: int) -> Answer | None:
    """Turn what a ``reply=`` gave into an :class:`Answer` (None: use the default)."""
    if value is None:
        return None
    if isinstance(value, str):
        return Answer(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"reply must give a str, a dict or None, not {type(value).__name__}")
    calls = value.get("tool_calls")
    tool_calls = [_normalize_call(call, n, j) for j, call in enumerate(calls)] if calls else None
    content = value.get("content")
    finish = value.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
    return Answer(content if content is not None or tool_calls else "", tool_calls, finish)


def _normalize_call(call: Mapping[str, Any], n: int, j: int) -> dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.get("id") or f"call_{n}_{j}",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def cap_answer(answer: Answer, max_tokens: int | None) -> Answer:
    """Cut a text reply that is longer than ``max_tokens``: finish_reason becomes length."""
    if max_tokens is None or answer.tool_calls or not answer.content:
        return answer
    if count_text(answer.content) <= max_tokens:
        return answer
    return Answer(truncate_to_tokens(answer.content, max_tokens), None, "length")


def filtered_answer(answer: Answer, pieces: int) -> Answer:
    """What is left of ``answer`` once a content filter stops it after ``pieces`` stream
    pieces (about two words each): finish_reason ``content_filter``."""
    words = (answer.content or "").split(" ")[: 2 * pieces]
    return Answer(" ".join(words), None, "content_filter")


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
