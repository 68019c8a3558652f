"""A real HTTP server on 127.0.0.1 that speaks OpenAI's Chat Completions wire format.

Tests talk to it through the real ``openai`` SDK, so what is exercised is
what runs in production: request serialization, status errors, SSE parsing,
retries (ours), timeouts. It is stdlib only: a
:class:`~http.server.ThreadingHTTPServer` in a background thread, HTTP/1.1
with keep-alive, ``Content-Length`` bodies and chunked SSE streams.

The model it pretends to be is deterministic (see
:mod:`~conversation_memory.testing.wire` for its tokenizer, rules and
replies); :class:`~conversation_memory.testing.Fault` scripts what goes wrong.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/<id>``; anything else is OpenAI's "Invalid URL" 404.
Every response carries ``x-request-id: req_<n>``.

Azure OpenAI's shape is served too, for ``openai.AzureOpenAI`` clients
(:meth:`ChatServer.azure_client`): ``POST /openai/deployments/<deployment>
/chat/completions?api-version=...`` with the key in an ``api-key`` header,
Azure's error bodies (no ``api-version``: 404 "Resource not found"; an
unknown deployment: ``DeploymentNotFound``; a wrong key: Azure's 401), the
served model's name in replies, and the content-filter fields.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.testing import wire
from conversation_memory.testing.faults import ContextStyle, Fault

if TYPE_CHECKING:
    import openai

__all__ = ["ChatServer", "RecordedRequest"]

CHAT_PATH = "/v1/chat/completions"
AZURE_API_VERSION = "2024-10-21"
"""The ``api-version`` :meth:`ChatServer.azure_client` asks for (a GA version)."""
_AZURE_CHAT = re.compile(r"/openai/deployments/([^/]+)/chat/completions")
_FINGERPRINT = "fp_convmem_test"
_MAX_BODY = 64 * 1024 * 1024
_HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body>Hi</body></html>\n"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: Any
    """The parsed JSON body, or None when there was none or it wasn't JSON."""
    raw: bytes
    time: float
    """``time.monotonic()`` when the request had been read."""
    fault: Fault | None = None
    """The queued fault applied to this request."""
    status: int | None = None
    """The HTTP status answered (None: the connection was closed before any)."""
    number: int = 0
    """Its place among every request since the start (or ``reset``), from 1: the ``n`` of
    its ``x-request-id: req_<n>``, so a log that dropped older ones still says which."""


@dataclass(slots=True)
class _Response:
    """What to send, and how badly."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    events: list[bytes] | None = None
    """SSE events (each a complete ``data: ...\\n\\n``): sent chunked when not None."""
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    chunk_bytes: int = 0
    finish_index: int = 0
    """Index of the stream event carrying finish_reason (a cut stops before it)."""
    close_after: int | None = None
    """Close the socket after this many events (streams) or half the body (-1: at once)."""


@dataclass(frozen=True, slots=True)
class _Azure:
    """An Azure request's route: which model serves it, and the API version asked for."""

    served: str
    api_version: str


def _json_response(status: int, body: Any) -> _Response:
    return _Response(status, json.dumps(body).encode())


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


class ChatServer:
    """A local OpenAI-compatible chat server for tests; use it as a context manager.

    ``window`` is the context limit: prompt tokens (by :meth:`count_tokens`)
    plus ``max_completion_tokens``/``max_tokens`` must fit, or the answer is a
    400 in ``overflow_style``. ``strict`` refuses message lists OpenAI would
    refuse, with OpenAI's texts (see :attr:`rejections`). ``reply`` replaces
    the default answer (``wire.ReplySpec``). With ``api_key`` set, other keys
    get OpenAI's 401.

    ``deployments`` maps Azure deployment names to the model each serves
    (the name its replies report); None serves any deployment as ``model``.

    ``keep_requests`` bounds the request log: :attr:`requests` and
    :attr:`rejections` hold the newest that many (``None`` keeps every one).
    Each request holds its whole body, so a long run (a lab replay, a
    benchmark) with an unbounded log grows by its every prompt.
    """

    def __init__(
        self,
        *,
        window: int = 4096,
        strict: bool = True,
        reply: wire.ReplySpec = None,
        model: str = "test-model",
        api_key: str | None = None,
        overflow_style: ContextStyle = "openai",
        host: str = "127.0.0.1",
        port: int = 0,
        deployments: Mapping[str, str] | None = None,
        keep_requests: int | None = 100,
    ) -> None:
        if keep_requests is not None and (
            isinstance(keep_requests, bool)
            or not isinstance(keep_requests, int)
            or keep_requests < 0
        ):
            raise ConfigurationError(
                f"keep_requests must be a number of requests (0 or more) or None for all of "
                f"them, got {keep_requests!r}.",
                argument="keep_requests",
            )
        if deployments is not None and (
            not isinstance(deployments, Mapping)
            or not all(isinstance(v, str) and v for v in deployments.values())
        ):
            raise ConfigurationError(
                "deployments must map Azure deployment names to the model each serves, e.g. "
                f"{{'prod-gpt4o': 'gpt-4o-2024-08-06'}}, got {deployments!r}.",
                argument="deployments",
            )
        self.window = window
        self.strict = strict
        self.reply = reply
        self.model = model
        self.api_key = api_key
        self.overflow_style: ContextStyle = overflow_style
        self.deployments = dict(deployments) if deployments is not None else None
        self._address = (host, port)
        self._lock = threading.RLock()  # reentrant: a reply= function may look at the server
        self._requests: deque[RecordedRequest] = deque(maxlen=keep_requests)
        self._rejections: deque[tuple[RecordedRequest, str]] = deque(maxlen=keep_requests)
        self._request_count = 0
        self._errors: list[str] = []
        self._faults: deque[Fault] = deque()
        self._replies = 0
        self._closing = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ChatServer:
        """Bind an ephemeral port and serve in a background thread."""
        if self._httpd is not None:
            return self
        self._closing.clear()
        httpd = _HTTPServer(self._address, _Handler)
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"ChatServer:{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, end sleeping faults, close every socket and join every thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._closing.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ addresses and clients

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the ChatServer is not running; use it in a `with` block")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, for ``openai.OpenAI(base_url=...)``."""
        return f"http://{self._address[0]}:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, for ``openai.AzureOpenAI(azure_endpoint=...)``."""
        return f"http://{self._address[0]}:{self.port}"

    def _azure_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "azure_endpoint": self.azure_endpoint,
            "api_key": self.api_key or "test-key",
            "api_version": AZURE_API_VERSION,
            "max_retries": 0,
            **options,
        }

    def azure_client(self, **options: Any) -> openai.AzureOpenAI:
        """An ``openai.AzureOpenAI`` for this server (SDK retries off); close it when done."""
        import openai

        return openai.AzureOpenAI(**self._azure_options(options))

    def async_azure_client(self, **options: Any) -> openai.AsyncAzureOpenAI:
        """An ``openai.AsyncAzureOpenAI`` for this server (SDK retries off)."""
        import openai

        return openai.AsyncAzureOpenAI(**self._azure_options(options))

    def _client_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_key": self.api_key or "test-key",
            "max_retries": 0,
            **options,
        }

    def client(self, **options: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` for this server (SDK retries off); close it when done."""
        import openai

        return openai.OpenAI(**self._client_options(options))

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` for this server (SDK retries off); close it when done."""
        import openai

        return openai.AsyncOpenAI(**self._client_options(options))

    # ------------------------------------------------------------------ what happened

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, faulted ones included, oldest first (a snapshot);
        only the newest ``keep_requests`` of them."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received since the start (or ``reset``), kept or not."""
        with self._lock:
            return self._request_count

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The chat completion requests, OpenAI's and Azure's routes alike (a snapshot)."""
        return [r for r in self.requests if r.method == "POST" and _is_chat(r.path)]

    @property
    def rejections(self) -> list[tuple[RecordedRequest, str]]:
        """Requests refused by strict validation, with the 400's message (the newest
        ``keep_requests``)."""
        with self._lock:
            return list(self._rejections)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of bugs inside the server itself (each was answered with a 500)."""
        with self._lock:
            return list(self._errors)

    # ------------------------------------------------------------------ scripting

    def fail(self, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` chat requests (after those already queued)."""
        if times < 0:
            raise ValueError("times must not be negative")
        with self._lock:
            self._faults.extend([fault] * times)

    def reset(self) -> None:
        """Forget recorded requests, rejections and queued faults; number requests and
        replies from 1."""
        with self._lock:
            self._requests.clear()
            self._rejections.clear()
            self._faults.clear()
            self._replies = 0
            self._request_count = 0

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    # ------------------------------------------------------------------ tokenizer

    def count_tokens(self, messages: Sequence[Mapping[str, Any]], *, tools: Any = None) -> int:
        """Prompt tokens by this server's own tokenizer (not tiktoken; see ``wire``)."""
        return wire.count_tokens(messages, tools=tools)

    def count_text(self, text: str) -> int:
        """Tokens of one string by this server's tokenizer: ceil(utf-8 bytes / 3)."""
        return wire.count_text(text)

    # ------------------------------------------------------------------ answering

    def _respond(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> _Response:
        """Decide the response and record the request (atomically, so order is kept)."""
        received = time.monotonic()
        body: Any = None
        parse_error = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                parse_error = True
        route, _, query = path.partition("?")
        azure = _AZURE_CHAT.fullmatch(route)
        with self._lock:
            self._request_count += 1
            request_number = self._request_count
            fault: Fault | None = None
            rejection: str | None = None
            try:
                if method == "POST" and (route == CHAT_PATH or azure is not None):
                    fault = self._faults.popleft() if self._faults else None
                    if azure is None:
                        response, rejection = self._chat(headers, body, parse_error, fault)
                    else:
                        deployment = urllib.parse.unquote(azure.group(1))
                        response, rejection = self._azure_chat(
                            headers, body, parse_error, fault, deployment=deployment, query=query
                        )
                else:
                    response = self._other(method, route)
            except Exception:
                self._errors.append(traceback.format_exc())
                response = _json_response(
                    500, wire.error_body("ChatServer bug; see server.errors", type="server_error")
                )
            status = None if response.close_after == -1 else response.status
            record = RecordedRequest(
                method, path, headers, body, raw, received, fault, status, request_number
            )
            self._requests.append(record)
            if rejection is not None:
                self._rejections.append((record, rejection))
        response.headers.append(("x-request-id", f"req_{request_number}"))
        return response

    def _other(self, method: str, route: str) -> _Response:
        if method == "GET" and route == "/v1/models":
            return _json_response(200, {"object": "list", "data": [self._model_card()]})
        if method == "GET" and route == f"/v1/models/{self.model}":
            return _json_response(200, self._model_card())
        if method == "GET" and route.startswith("/v1/models/"):
            name = route.removeprefix("/v1/models/")
            return _json_response(
                404,
                wire.error_body(
                    f"The model '{name}' does not exist", param="model", code="model_not_found"
                ),
            )
        return _json_response(404, wire.error_body(f"Invalid URL ({method} {route})"))

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": 0, "owned_by": "convmem-test"}

    def _azure_chat(
        self,
        headers: Mapping[str, str],
        body: Any,
        parse_error: bool,
        fault: Fault | None,
        *,
        deployment: str,
        query: str,
    ) -> tuple[_Response, str | None]:
        versions = urllib.parse.parse_qs(query).get("api-version")
        if not versions:
            return self._apply(_json_response(404, wire.AZURE_NOT_FOUND), fault), None
        if self.deployments is None:
            served: str | None = self.model
        else:
            served = self.deployments.get(deployment)
        if served is None:
            return self._apply(_json_response(404, wire.AZURE_NO_DEPLOYMENT), fault), None
        azure = _Azure(served=served, api_version=versions[0])
        return self._chat(headers, body, parse_error, fault, azure=azure)

    def _chat(
        self,
        headers: Mapping[str, str],
        body: Any,
        parse_error: bool,
        fault: Fault | None,
        *,
        azure: _Azure | None = None,
    ) -> tuple[_Response, str | None]:
        if azure is not None:
            sent_key = headers.get("api-key", "").strip()
        else:
            sent_key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if fault is not None and fault.kind == "status":
            return self._apply(self._status(fault, sent_key, headers, azure), fault), None
        if fault is not None and fault.kind == "not_json":
            return self._apply(_Response(200, _HTML_PAGE, "text/html; charset=utf-8"), fault), None
        if self.api_key is not None and sent_key != self.api_key:
            denied = azure and wire.azure_status_body(401, api_version=azure.api_version)
            if denied:
                return self._apply(_json_response(401, denied), fault), None
            content_type, data = wire.status_body(401, model=self.model, api_key=sent_key)
            return self._apply(_Response(401, data, content_type), fault), None
        if parse_error or body is None:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON. If you have trouble figuring "
                "out how to fix this, please contact us through our help center at "
                "help.openai.com.)"
            )
            return self._apply(_json_response(400, wire.error_body(message)), fault), None
        if self.strict:
            invalid = wire.validate(body)
            if invalid is not None:
                response = _json_response(400, invalid.body())
                return self._apply(response, fault), invalid.message
        elif not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
            response = _json_response(400, wire.error_body("'messages' is required"))
            return self._apply(response, fault), None
        messages = body["messages"]
        prompt = wire.count_tokens(messages, tools=body.get("tools") or body.get("functions"))
        max_tokens = wire.max_tokens_of(body)
        if fault is not None and fault.kind == "context_length":
            window = fault.limit if fault.limit is not None else self.window
            response = self._overflow(fault.style, window, prompt, max_tokens)
            return self._apply(response, fault), None
        if prompt + (max_tokens or 0) > self.window:
            response = self._overflow(self.overflow_style, self.window, prompt, max_tokens)
            return self._apply(response, fault), None
        response = self._completion(body, prompt, max_tokens, fault=fault, azure=azure)
        return self._apply(response, fault), None

    def _status(
        self, fault: Fault, sent_key: str, headers: Mapping[str, str], azure: _Azure | None
    ) -> _Response:
        code = fault.code or 500
        azure_body = azure and wire.azure_status_body(code, api_version=azure.api_version)
        if fault.echo_headers:
            quoted = "; ".join(f"{name}: {value}" for name, value in headers.items())
            content_type = "application/json"
            message = f"The upstream refused the request (status {code}). Request headers: {quoted}"
            data = json.dumps(wire.error_body(message, type="gateway_error")).encode()
        elif fault.body is None and azure_body:
            content_type, data = "application/json", json.dumps(azure_body).encode()
        elif fault.body is None:
            content_type, data = wire.status_body(code, model=self.model, api_key=sent_key)
        elif isinstance(fault.body, bytes | str):
            content_type = "text/plain; charset=utf-8"
            data = fault.body.encode() if isinstance(fault.body, str) else fault.body
        else:
            content_type, data = "application/json", json.dumps(fault.body).encode()
        response = _Response(code, data, content_type, list(fault.headers))
        if code == 429:
            response.headers += [
                ("x-ratelimit-limit-tokens", "10000"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "600ms"),
            ]
        return response

    @staticmethod
    def _overflow(
        style: ContextStyle, window: int, prompt: int, max_tokens: int | None
    ) -> _Response:
        if style == "llamacpp":
            return _json_response(400, wire.llamacpp_context_body(window, prompt))
        if style == "llama-cpp-python":
            return _json_response(
                400, wire.llama_cpp_python_context_body(window, prompt, max_tokens)
            )
        return _json_response(400, wire.openai_context_body(window, prompt, max_tokens or 0))

    def _answer(self, body: Mapping[str, Any], max_tokens: int | None) -> wire.Answer:
        self._replies += 1
        n = self._replies
        spec = self.reply
        given = spec(dict(body)) if callable(spec) else spec
        answer = wire.normalize_answer(given, n)
        if answer is None:
            if wire.is_summarization(body):
                answer = wire.Answer(wire.default_summary(body, max_tokens))
            else:
                answer = wire.Answer(wire.default_reply(body, n))
        return wire.cap_answer(answer, max_tokens)

    def _completion(
        self,
        body: Mapping[str, Any],
        prompt: int,
        max_tokens: int | None,
        *,
        fault: Fault | None = None,
        azure: _Azure | None = None,
    ) -> _Response:
        answer = self._answer(body, max_tokens)
        filtered: str | None = None
        if fault is not None and fault.kind == "content_filter":
            answer = wire.filtered_answer(answer, fault.after_chunks)
            filtered = fault.category
        completion = wire.completion_tokens(answer.content, answer.tool_calls)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        head = {
            "id": f"chatcmpl-test{self._replies:06d}",
            "created": int(time.time()),
            "model": azure.served if azure else str(body.get("model") or self.model),
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
                choice["content_filter_results"] = wire.filter_results(filtered)
                payload["prompt_filter_results"] = _prompt_filter_results()
            return _json_response(200, payload)
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
        events = _stream_events(
            head,
            answer,
            usage if include_usage else None,
            azure=azure is not None,
            filtered=filtered,
        )
        return _Response(
            200,
            content_type="text/event-stream; charset=utf-8",
            events=events,
            finish_index=len(events) - (3 if include_usage else 2),
        )

    def _apply(self, response: _Response, fault: Fault | None) -> _Response:
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
                    response.events.append(_sse("[DONE]"))
        elif kind == "sse_error":
            error = wire.error_body(fault.message, type="server_error")
            if response.events is None:
                response.body = json.dumps(error).encode()
            else:
                response.events = [
                    *response.events[: fault.after_chunks],
                    _sse(error, event="error"),
                ]
        elif kind == "malformed_json":
            if response.events is None:
                response.body = response.body[: len(response.body) // 2]
            else:
                first = response.events[0]
                response.events = [first[: len(first) // 2] + b"\n\n"]
        return response


def _prompt_filter_results() -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": wire.filter_results()}]


def _stream_events(
    head: Mapping[str, Any],
    answer: wire.Answer,
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
            choice["content_filter_results"] = {} if role_chunk else wire.filter_results(caught)
        data: dict[str, Any] = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if usage is not None:
            data["usage"] = None
        return _sse(data)

    events = []
    if azure:
        events.append(
            _sse(
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
            _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    events.append(_sse("[DONE]"))
    return events


def _is_chat(path: str) -> bool:
    route = path.partition("?")[0]
    return route == CHAT_PATH or _AZURE_CHAT.fullmatch(route) is not None


def _pieces(text: str) -> list[str]:
    """Split text into stream deltas of about two words each (joined, they are ``text``)."""
    words = text.split(" ")
    pieces = []
    for i in range(0, len(words), 2):
        piece = " ".join(words[i : i + 2])
        pieces.append(piece if i + 2 >= len(words) else piece + " ")
    return [p for p in pieces if p]


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so that closing can wake and end every handler."""

    daemon_threads = False
    block_on_close = True
    app: ChatServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (or going quiet) are expected; anything else is recorded."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        with self.app._lock:
            self.app._errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 60

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's
        # algorithm meets the client's delayed ACK and each reply waits ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        response = self.server.app._respond(self.command, self.path, headers, raw)
        try:
            self._send(response)
        except OSError:
            self.close_connection = True

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the server closes first; False when it did."""
        return not (seconds > 0 and self.server.app._closing.wait(seconds))

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, response: _Response) -> None:
        if not self._wait(response.first_byte_delay) or response.close_after == -1:
            self._hang_up()
            return
        self.send_response(response.status)
        self.send_header("content-type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        if response.events is None:
            self._send_body(response)
        else:
            self._send_events(response)

    def _send_body(self, response: _Response) -> None:
        body = response.body
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if response.close_after is not None:
            self.wfile.write(body[: len(body) // 2])
            self._hang_up()
            return
        size = response.chunk_bytes or len(body) or 1
        for offset in range(0, len(body), size):
            if offset and not self._wait(response.chunk_delay):
                self._hang_up()
                return
            self.wfile.write(body[offset : offset + size])

    def _send_events(self, response: _Response) -> None:
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, event in enumerate(response.events or ()):
            if response.close_after is not None and i >= response.close_after:
                self._hang_up()
                return
            if i and not self._wait(response.chunk_delay):
                self._hang_up()
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if response.close_after is not None:
            self._hang_up()
            return
        self.wfile.write(b"0\r\n\r\n")
