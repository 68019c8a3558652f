"""A real HTTP server on 127.0.0.1 that speaks OpenAI's Chat Completions wire format.

Tests talk to it through the real ``openai`` SDK, so what is exercised is
what runs in production: request serialization, status errors, SSE parsing,
retries (ours), timeouts. It is stdlib only.

The server is four layers, each in its own module:

- :class:`ChatServer` (here): settings, the request log, queued faults, and
  routing: which request gets which answer;
- the model it pretends to be, deterministic and pure:
  :mod:`~conversation_memory.testing.tokenizer` (its own token counts),
  :mod:`~conversation_memory.testing.refusals` (what strict mode refuses, and
  every error body), :mod:`~conversation_memory.testing.replies` (what it
  answers); :class:`~conversation_memory.testing.Fault` scripts what goes wrong;
- :mod:`~conversation_memory.testing._responses`: those answers as HTTP
  responses (completion bodies, SSE chunks), spoiled as a fault says;
- :mod:`~conversation_memory.testing._http`: the sockets (a
  ``ThreadingHTTPServer`` in a background thread, HTTP/1.1 keep-alive,
  ``Content-Length`` bodies and chunked SSE streams).

Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings`` (see
:mod:`~conversation_memory.testing.embeddings`), ``GET /v1/models``,
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

import json
import re
import threading
import time
import traceback
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.testing import _responses, embeddings, refusals, replies, tokenizer
from conversation_memory.testing._http import HTTPServer, Response
from conversation_memory.testing._responses import AzureRoute, json_response
from conversation_memory.testing.faults import ContextStyle, Fault

if TYPE_CHECKING:
    import openai

__all__ = ["ChatServer", "RecordedRequest"]

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
AZURE_API_VERSION = "2024-10-21"
"""The ``api-version`` :meth:`ChatServer.azure_client` asks for (a GA version)."""
_AZURE_CHAT = re.compile(r"/openai/deployments/([^/]+)/chat/completions")


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


class ChatServer:
    """A local OpenAI-compatible chat server for tests; use it as a context manager.

    ``window`` is the context limit: prompt tokens (by :meth:`count_tokens`)
    plus ``max_completion_tokens``/``max_tokens`` must fit, or the answer is a
    400 in ``overflow_style``. ``strict`` refuses message lists OpenAI would
    refuse, with OpenAI's texts (see :attr:`rejections`). ``reply`` replaces
    the default answer (:data:`~conversation_memory.testing.ReplySpec`). With
    ``api_key`` set, other keys get OpenAI's 401.

    ``deployments`` maps Azure deployment names to the model each serves
    (the name its replies report); None serves any deployment as ``model``.

    ``keep_requests`` bounds the request log: :attr:`requests` and
    :attr:`rejections` hold the newest that many (``None`` keeps every one).
    Each request holds its whole body, so a long run (a lab replay, a
    benchmark) with an unbounded log grows by its every prompt.

    ``embedder`` is the model behind ``POST /v1/embeddings``: given the texts
    and the ``dimensions`` asked for (None: its own), one vector per text.
    The default is a deterministic hashed bag of words
    (:func:`~conversation_memory.testing.embeddings.hashed_embedding`); a
    real model can be plugged in for a benchmark. Faults for that route are
    queued apart: ``fail(fault, route="embeddings")``.
    """

    def __init__(
        self,
        *,
        window: int = 4096,
        strict: bool = True,
        reply: replies.ReplySpec = None,
        model: str = "test-model",
        api_key: str | None = None,
        overflow_style: ContextStyle = "openai",
        host: str = "127.0.0.1",
        port: int = 0,
        deployments: Mapping[str, str] | None = None,
        keep_requests: int | None = 100,
        embedder: embeddings.Embedder | None = None,
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
        self.embedder: embeddings.Embedder = embedder or embeddings.hashed_model
        self._address = (host, port)
        self._lock = threading.RLock()  # reentrant: a reply= function may look at the server
        self._requests: deque[RecordedRequest] = deque(maxlen=keep_requests)
        self._rejections: deque[tuple[RecordedRequest, str]] = deque(maxlen=keep_requests)
        self._request_count = 0
        self._errors: list[str] = []
        self._faults: deque[Fault] = deque()
        self._embedding_faults: deque[Fault] = deque()
        self._replies = 0
        self._closing = threading.Event()
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ChatServer:
        """Bind an ephemeral port and serve in a background thread."""
        if self._httpd is not None:
            return self
        self._closing.clear()
        httpd = HTTPServer(
            self._address, respond=self._respond, closing=self._closing, on_error=self._bug
        )
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
    def embedding_requests(self) -> list[RecordedRequest]:
        """The embeddings requests (a snapshot)."""
        return [r for r in self.requests if r.method == "POST" and r.path == EMBEDDINGS_PATH]

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

    def fail(self, fault: Fault, times: int = 1, *, route: str = "chat") -> None:
        """Apply ``fault`` to the next ``times`` chat requests (after those already queued);
        ``route="embeddings"``: to the next embeddings requests instead (their own queue;
        status, not-JSON and transport faults apply there)."""
        if times < 0:
            raise ValueError("times must not be negative")
        if route not in ("chat", "embeddings"):
            raise ValueError(f"route must be 'chat' or 'embeddings', not {route!r}")
        if route == "embeddings" and fault.kind in ("context_length", "content_filter"):
            raise ValueError(f"Fault.{fault.kind} is about chat replies, not embeddings")
        with self._lock:
            queue = self._faults if route == "chat" else self._embedding_faults
            queue.extend([fault] * times)

    def reset(self) -> None:
        """Forget recorded requests, rejections and queued faults; number requests and
        replies from 1."""
        with self._lock:
            self._requests.clear()
            self._rejections.clear()
            self._faults.clear()
            self._embedding_faults.clear()
            self._replies = 0
            self._request_count = 0

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    # ------------------------------------------------------------------ tokenizer

    # Static: the tokenizer needs no running server (the lab's test model counts with it).

    @staticmethod
    def count_tokens(messages: Sequence[Mapping[str, Any]], *, tools: Any = None) -> int:
        """Prompt tokens by this server's own tokenizer (not tiktoken; see
        :mod:`~conversation_memory.testing.tokenizer`)."""
        return tokenizer.count_tokens(messages, tools=tools)

    @staticmethod
    def count_text(text: str) -> int:
        """Tokens of one string by this server's tokenizer: ceil(utf-8 bytes / 3)."""
        return tokenizer.count_text(text)

    # ------------------------------------------------------------------ answering

    def _respond(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Response:
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
                elif method == "POST" and route == EMBEDDINGS_PATH:
                    queue = self._embedding_faults
                    fault = queue.popleft() if queue else None
                    response = self._embeddings(headers, body, parse_error, fault)
                else:
                    response = self._other(method, route)
            except Exception:
                self._errors.append(traceback.format_exc())
                response = json_response(
                    500,
                    refusals.error_body("ChatServer bug; see server.errors", type="server_error"),
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

    def _bug(self, trace: str) -> None:
        with self._lock:
            self._errors.append(trace)

    def _other(self, method: str, route: str) -> Response:
        if method == "GET" and route == "/v1/models":
            return json_response(200, {"object": "list", "data": [self._model_card()]})
        if method == "GET" and route == f"/v1/models/{self.model}":
            return json_response(200, self._model_card())
        if method == "GET" and route.startswith("/v1/models/"):
            name = route.removeprefix("/v1/models/")
            return json_response(
                404,
                refusals.error_body(
                    f"The model '{name}' does not exist", param="model", code="model_not_found"
                ),
            )
        return json_response(404, refusals.error_body(f"Invalid URL ({method} {route})"))

    def _embeddings(
        self, headers: Mapping[str, str], body: Any, parse_error: bool, fault: Fault | None
    ) -> Response:
        sent_key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if fault is not None and fault.kind == "status":
            failed = _responses.status(
                fault, model=self.model, sent_key=sent_key, headers=headers, azure=None
            )
            return _responses.apply(failed, fault)
        if fault is not None and fault.kind == "not_json":
            return _responses.apply(_responses.not_json(), fault)
        if self.api_key is not None and sent_key != self.api_key:
            content_type, data = refusals.status_body(401, model=self.model, api_key=sent_key)
            return _responses.apply(Response(401, data, content_type), fault)
        problem = "We could not parse the JSON body of your request." if parse_error else None
        problem = problem or embeddings.invalid(body)
        if problem is not None:
            return _responses.apply(json_response(400, refusals.error_body(problem)), fault)
        status, answer = embeddings.answer(body, self.embedder)
        return _responses.apply(json_response(status, answer), fault)

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
    ) -> tuple[Response, str | None]:
        versions = urllib.parse.parse_qs(query).get("api-version")
        if not versions:
            return _responses.apply(json_response(404, refusals.AZURE_NOT_FOUND), fault), None
        if self.deployments is None:
            served: str | None = self.model
        else:
            served = self.deployments.get(deployment)
        if served is None:
            return _responses.apply(json_response(404, refusals.AZURE_NO_DEPLOYMENT), fault), None
        azure = AzureRoute(served=served, api_version=versions[0])
        return self._chat(headers, body, parse_error, fault, azure=azure)

    def _chat(
        self,
        headers: Mapping[str, str],
        body: Any,
        parse_error: bool,
        fault: Fault | None,
        *,
        azure: AzureRoute | None = None,
    ) -> tuple[Response, str | None]:
        if azure is not None:
            sent_key = headers.get("api-key", "").strip()
        else:
            sent_key = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if fault is not None and fault.kind == "status":
            failed = _responses.status(
                fault, model=self.model, sent_key=sent_key, headers=headers, azure=azure
            )
            return _responses.apply(failed, fault), None
        if fault is not None and fault.kind == "not_json":
            return _responses.apply(_responses.not_json(), fault), None
        if self.api_key is not None and sent_key != self.api_key:
            denied = azure and refusals.azure_status_body(401, api_version=azure.api_version)
            if denied:
                return _responses.apply(json_response(401, denied), fault), None
            content_type, data = refusals.status_body(401, model=self.model, api_key=sent_key)
            return _responses.apply(Response(401, data, content_type), fault), None
        if parse_error or body is None:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON. If you have trouble figuring "
                "out how to fix this, please contact us through our help center at "
                "help.openai.com.)"
            )
            return _responses.apply(json_response(400, refusals.error_body(message)), fault), None
        if self.strict:
            invalid = refusals.validate(body)
            if invalid is not None:
                response = json_response(400, invalid.body())
                return _responses.apply(response, fault), invalid.message
        elif not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
            response = json_response(400, refusals.error_body("'messages' is required"))
            return _responses.apply(response, fault), None
        messages = body["messages"]
        prompt = tokenizer.count_tokens(messages, tools=body.get("tools") or body.get("functions"))
        max_tokens = tokenizer.max_tokens_of(body)
        if fault is not None and fault.kind == "context_length":
            window = fault.limit if fault.limit is not None else self.window
            response = _responses.overflow(fault.style, window, prompt, max_tokens)
            return _responses.apply(response, fault), None
        if prompt + (max_tokens or 0) > self.window:
            response = _responses.overflow(self.overflow_style, self.window, prompt, max_tokens)
            return _responses.apply(response, fault), None
        answer = self._answer(body, max_tokens)
        response = _responses.completion(
            body, answer, prompt, number=self._replies, model=self.model, fault=fault, azure=azure
        )
        return _responses.apply(response, fault), None

    def _answer(self, body: Mapping[str, Any], max_tokens: int | None) -> replies.Answer:
        self._replies += 1
        n = self._replies
        spec = self.reply
        given = spec(dict(body)) if callable(spec) else spec
        answer = replies.normalize_answer(given, n)
        if answer is None:
            if replies.is_summarization(body):
                answer = replies.Answer(replies.default_summary(body, max_tokens))
            else:
                answer = replies.Answer(replies.default_reply(body, n))
        return replies.cap_answer(answer, max_tokens)


def _is_chat(path: str) -> bool:
    route = path.partition("?")[0]
    return route == CHAT_PATH or _AZURE_CHAT.fullmatch(route) is not None
