"""The model-call layer: parameters, retries, error mapping, streaming.

Unit tests cover the pure parts (parameters, Retry-After, waits, error
classification, delta assembly, completion_from). Integration tests drive
the real ``openai`` SDK over real HTTP against ``ChatServer`` and its faults;
every test but the deadline ones injects ``sleep`` so retries are instant and
their waits can be asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import anyio
import httpx2
import openai
import pytest

from conversation_memory.errors import (
    AuthenticationFailed,
    BadRequest,
    ConfigurationError,
    ConnectionFailed,
    ContextLengthExceeded,
    MalformedResponse,
    ModelError,
    ModelTimeout,
    RateLimited,
    ServerError,
)
from conversation_memory.llm import (
    LLM,
    AsyncLLM,
    Completion,
    RetryPolicy,
    Usage,
    async_client_from_env,
    check_params,
    client_from_env,
    completion_from,
    context_limits,
    map_error,
    parse_retry_after,
    server_configured,
)
from conversation_memory.llm.assembly import Assembler
from conversation_memory.testing import ChatServer, Fault

MODEL = "gpt-4o-mini"  # registry: max_output 16384
MESSAGES = [{"role": "user", "content": "hello there, how are you today?"}]
NOW = 1_700_000_000.0
NO_JITTER = RetryPolicy(jitter=0)


# --- parameters --------------------------------------------------------------------------


def test_valid_params_pass_through() -> None:
    params = {
        "temperature": 0,
        "top_p": 1,
        "frequency_penalty": -2,
        "presence_penalty": 2,
        "max_tokens": 16384,
        "n": 1,
        "seed": 7,
        "stop": ["a", "b", "c", "d"],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "user": None,
    }
    out = check_params(params, model=MODEL)
    assert out == {k: v for k, v in params.items() if v is not None}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 2.01),
        ("temperature", -0.1),
        ("temperature", "1"),
        ("temperature", True),
        ("temperature", float("nan")),
        ("top_p", 0),
        ("top_p", 1.5),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", 16385),
        ("max_completion_tokens", 100_000),
        ("n", 2),
        ("seed", 1.0),
        ("seed", False),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", []),
        ("stop", [1]),
        ("stream", True),
        ("stream_options", {"include_usage": False}),
        ("timeout", 5),
        ("model", "x"),
        ("tools", [{"type": "function"}]),
        ("tools", [{"type": "retrieval", "function": {"name": "f"}}]),
        ("tools", {"type": "function", "function": {"name": "f"}}),
        ("extra_body", [1]),
    ],
)
def test_bad_param_is_named(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_params({name: value}, model=MODEL)
    assert info.value.argument == name
    assert name in str(info.value)


def test_max_tokens_bound_only_for_known_models() -> None:
    assert check_params({"max_tokens": 10**6}, model="my-local-gguf") == {"max_tokens": 10**6}
    with pytest.raises(ConfigurationError, match="16384"):
        check_params({"max_completion_tokens": 20000}, model="gpt-4o-mini-2024-07-18")


def test_max_tokens_aliases_are_exclusive() -> None:
    with pytest.raises(ConfigurationError, match="only one"):
        check_params({"max_tokens": 5, "max_completion_tokens": 5}, model=MODEL)


def test_unknown_params_go_to_extra_body_but_typos_are_refused() -> None:
    out = check_params(
        {"top_k": 40, "min_p": 0.05, "extra_body": {"grammar": "root ::= x"}}, model=MODEL
    )
    assert out == {"extra_body": {"top_k": 40, "min_p": 0.05, "grammar": "root ::= x"}}
    with pytest.raises(ConfigurationError, match="'temperature'") as info:
        check_params({"temprature": 1}, model=MODEL)
    assert info.value.argument == "temprature"


def test_tools_must_have_unique_function_names() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    assert check_params({"tools": [tool]}, model=MODEL) == {"tools": [tool]}
    with pytest.raises(ConfigurationError, match="repeats"):
        check_params({"tools": [tool, tool]}, model=MODEL)


# --- retry policy and Retry-After --------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": format_datetime(datetime.fromtimestamp(NOW + 7, UTC), usegmt=True)}, 7),
        ({"retry-after": "Tue, 14 Nov 2023 22:13:27 -0000"}, 7),
        ({"retry-after": format_datetime(datetime.fromtimestamp(NOW - 60, UTC), usegmt=True)}, 0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-1"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected
    assert parse_retry_after(httpx2.Headers(headers), now=NOW) == expected


def test_backoff_grows_caps_and_jitters() -> None:
    policy = RetryPolicy(initial=0.5, multiplier=2, max_wait=3, jitter=0.2)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff(2, rand=0.999) == pytest.approx(0.8, abs=1e-3)
    assert policy.backoff(10_000) == 3.0


def test_wait_is_the_larger_of_backoff_and_capped_retry_after() -> None:
    policy = RetryPolicy(initial=1, jitter=0, retry_after_cap=10)
    assert policy.wait(1, None) == 1
    assert policy.wait(1, 0.2) == 1
    assert policy.wait(1, 4) == 4
    assert policy.wait(1, 500) == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempts", 0), ("attempts", 1.5), ("initial", -1), ("multiplier", 0.5), ("jitter", 2),
     ("deadline", 0), ("max_wait", float("inf"))],
)  # fmt: skip
def test_retry_policy_is_validated(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**{field: value})
    assert info.value.argument == field


# --- error classification ----------------------------------------------------------------


def _status_error(status: int, body: Any, headers: dict[str, str] | None = None) -> Exception:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(
        status, json=body, headers={"x-request-id": "req_x", **(headers or {})}, request=request
    )
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1")
    with client:
        return client._make_status_error_from_response(response)


def _map(exc: BaseException) -> ModelError | None:
    return map_error(exc, model=MODEL, attempts=2, now=lambda: NOW)


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (400, BadRequest, False),
        (401, AuthenticationFailed, False),
        (403, AuthenticationFailed, False),
        (404, BadRequest, False),
        (408, ModelTimeout, True),
        (409, BadRequest, True),
        (413, BadRequest, False),
        (422, BadRequest, False),
        (429, RateLimited, True),
        (500, ServerError, True),
        (502, ServerError, True),
        (503, ServerError, True),
    ],
)
def test_status_errors_are_classified(status: int, cls: type, retryable: bool) -> None:
    error = _map(_status_error(status, {"error": {"message": "nope"}}, {"retry-after": "3"}))
    assert type(error) is cls
    assert error.status == status
    assert error.request_id == "req_x"
    assert error.attempts == 2
    assert error.model == MODEL
    assert error.retryable is retryable
    assert "nope" in str(error)


def test_authentication_error_says_how_to_fix() -> None:
    error = _map(_status_error(401, {"error": {"message": "Incorrect API key"}}))
    assert isinstance(error, PermissionError)
    for hint in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "client="):
        assert hint in str(error)


def test_rate_limit_keeps_retry_after() -> None:
    error = _map(_status_error(429, {"error": {}}, {"retry-after-ms": "250"}))
    assert error is not None
    assert error.retry_after == 0.25


OPENAI_MESSAGES = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "9000 tokens. Please reduce the length of the messages."
)
OPENAI_REQUESTED = (
    "This model's maximum context length is 8192 tokens. However, you requested 9100 tokens "
    "(9000 in the messages, 100 in the completion). Please reduce the length of the messages "
    "or completion."
)
LLAMACPP = (
    "request (9000 tokens) exceeds the available context size (8192 tokens), try increasing it"
)


@pytest.mark.parametrize(
    ("body", "limit", "requested"),
    [
        ({"error": {"message": OPENAI_MESSAGES, "code": "context_length_exceeded"}}, 8192, 9000),
        ({"error": {"message": OPENAI_REQUESTED, "code": "context_length_exceeded"}}, 8192, 9100),
        ({"error": {"message": OPENAI_REQUESTED}}, 8192, 9100),
        ({"error": {"message": LLAMACPP, "type": "exceed_context_size_error"}}, 8192, 9000),
        (
            {"error": {"message": "too big", "type": "exceed_context_size_error",
                       "n_ctx": 2048, "n_prompt_tokens": 3000}},
            2048,
            3000,
        ),
        ({"error": {"message": "you requested 3000 tokens but n_ctx = 2048"}}, 2048, 3000),
        ({"error": {"message": "the request exceeds the available context size"}}, None, None),
        ({"error": {"message": "x", "code": "context_length_exceeded"}}, None, None),
    ],
)  # fmt: skip
def test_context_length_errors_in_every_wording(
    body: dict[str, Any], limit: int | None, requested: int | None
) -> None:
    error = _map(_status_error(400, body))
    assert isinstance(error, ContextLengthExceeded)
    assert (error.limit, error.requested) == (limit, requested)
    assert error.retryable is False
    assert context_limits(body) == (limit, requested)


def test_raw_exceptions_that_escape_the_sdk_are_mapped() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    cases: list[tuple[BaseException, type]] = [
        (json.JSONDecodeError("Expecting value", "{", 1), MalformedResponse),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), MalformedResponse),
        (httpx2.ReadTimeout("slow", request=request), ModelTimeout),
        (httpx2.ReadTimeout("slow"), ModelTimeout),
        (httpx2.RemoteProtocolError("peer closed", request=request), ConnectionFailed),
        (httpx2.DecodingError("bad gzip", request=request), MalformedResponse),
        (anyio.EndOfStream(), ConnectionFailed),
        (openai.APITimeoutError(request=request), ModelTimeout),
        (openai.APIConnectionError(request=request), ConnectionFailed),
        (openai.APIError("boom", request, body={"message": "boom"}), ServerError),
    ]
    for exc, cls in cases:
        assert type(_map(exc)) is cls, exc
    assert _map(KeyError("a bug of ours")) is None


# --- assembly ----------------------------------------------------------------------------


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> Any:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"model": "served-model", "choices": choices, **extra}


def test_deltas_assemble_text_and_tool_calls_by_index() -> None:
    assembler = Assembler(MODEL)
    pieces = [
        assembler.feed(chunk)
        for chunk in [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "Let me "}),
            _chunk({"content": "check."}),
            _chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "two"}}]}),
            _chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                    "function": {"name": "one", "arguments": ""}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
            _chunk({"tool_calls": [{"index": 1, "function": {"name": "two", "arguments": "{}"}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            _chunk({}, "tool_calls"),
            _chunk(usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}),
        ]
    ]  # fmt: skip
    assert "".join(pieces) == "Let me check."
    done = assembler.completion(request_id="r", latency_ms=1.0, attempts=1, complete=True)
    assert done.message == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "one", "arguments": '{"x": 1}'}},
            {"id": "b", "type": "function", "function": {"name": "two", "arguments": "{}"}},
        ],
    }
    assert done.finish_reason == "tool_calls"
    assert done.usage == Usage(5, 7, 12, reported=True)
    assert done.model == "served-model"
    assert done.complete


def test_tool_calls_without_index_or_content_and_without_usage() -> None:
    assembler = Assembler(MODEL)
    assembler.feed(
        _chunk({"tool_calls": [{"id": "c1", "function": {"name": "get_", "arguments": "{"}}]})
    )
    assembler.feed(_chunk({"tool_calls": [{"function": {"name": "time", "arguments": "}"}}]}))
    done = assembler.completion(request_id=None, latency_ms=0, attempts=1, complete=True)
    assert done.message["content"] is None
    assert done.message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert done.usage == Usage(None, None, None, reported=False)
    assert not done.complete  # no finish_reason arrived


def test_bad_chunks_raise_mapped_errors() -> None:
    with pytest.raises(MalformedResponse):
        Assembler(MODEL).feed([1, 2])
    with pytest.raises(ServerError, match="overloaded"):
        Assembler(MODEL).feed({"error": {"message": "overloaded", "type": "server_error"}})


# --- completion_from ---------------------------------------------------------------------

BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {"id": "c", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}
                ],
            },
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}  # fmt: skip


def test_completion_from_sdk_object_dict_message_and_text() -> None:
    from openai.types.chat import ChatCompletion

    for obj in (ChatCompletion.model_validate(BODY), BODY):
        done = completion_from(obj, model=MODEL)
        assert done.text == ""
        assert done.message == {
            "role": "assistant",
            "content": None,
            "tool_calls": BODY["choices"][0]["message"]["tool_calls"],
        }
        assert done.usage == Usage(3, 4, 7, reported=True)
        assert done.model == "gpt-4o-mini-2024-07-18"
        assert done.finish_reason == "tool_calls"
        assert done.complete
    text = completion_from("just text", model=MODEL)
    assert (text.text, text.message, text.usage.reported) == (
        "just text",
        {"role": "assistant", "content": "just text"},
        False,
    )
    message = completion_from({"role": "assistant", "content": "hi"}, model=MODEL)
    assert message.text == "hi"


@pytest.mark.parametrize("obj", [{"choices": []}, {"choices": [{"message": 3}]}, [BODY], 42])
def test_completion_from_rejects_other_shapes(obj: Any) -> None:
    with pytest.raises(MalformedResponse):
        completion_from(obj, model=MODEL)


# --- clients -----------------------------------------------------------------------------


def test_client_from_env_uses_only_the_given_environment() -> None:
    with client_from_env({"OPENAI_API_KEY": "sk-1", "OPENAI_BASE_URL": "http://h:1/v1"}) as c:
        assert (c.api_key, str(c.base_url), c.max_retries) == ("sk-1", "http://h:1/v1/", 0)
    with client_from_env({"OPENAI_BASE_URL": "http://h:1/v1"}) as c:
        assert c.api_key  # a local server needs no key; a placeholder is sent
    with client_from_env({"OPENAI_API_KEY": "sk-2"}) as c:
        assert str(c.base_url) == "https://api.openai.com/v1/"
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY") as info:
        client_from_env({})
    assert info.value.argument == "OPENAI_API_KEY"
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        client_from_env({"OPENAI_API_KEY": "k"}, max_retries=2)
    assert isinstance(async_client_from_env({"OPENAI_API_KEY": "k"}), openai.AsyncOpenAI)


def test_server_configured_says_whether_client_from_env_has_a_server() -> None:
    assert server_configured({"OPENAI_API_KEY": "sk-1"})
    assert server_configured({"OPENAI_BASE_URL": "http://h:1/v1"})
    assert not server_configured({})
    assert not server_configured({"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""})
    with pytest.raises(ConfigurationError):  # the same environment client_from_env refuses
        client_from_env({"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""})


def test_sdk_retries_are_switched_off_and_clients_checked() -> None:
    with openai.OpenAI(api_key="k", base_url="http://h:1/v1", max_retries=5) as client:
        llm = LLM(client)
        assert llm.client.max_retries == 0
        assert client.max_retries == 5  # the caller's client is left alone
        with pytest.raises(ConfigurationError, match="AsyncOpenAI"):
            AsyncLLM(client)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="client"):
        LLM(object())  # type: ignore[arg-type]
    azure = openai.AzureOpenAI(
        api_key="k", azure_endpoint="http://h:1", api_version="2024-06-01", max_retries=3
    )
    assert LLM(azure).client.max_retries == 0


# --- integration: ChatServer through the real SDK ----------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ChatServer]:
    with ChatServer(window=4096) as server:
        yield server


@pytest.fixture
def chat(server: ChatServer) -> Iterator[ChatServer]:
    server.reset()
    yield server
    assert not server.errors


@pytest.fixture
def client(chat: ChatServer) -> Iterator[openai.OpenAI]:
    with chat.client() as client:
        yield client


class Sleeps(list[float]):
    """An injected sleep that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(float(seconds))

    async def asleep(self, seconds: float) -> None:
        self.append(float(seconds))


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def llm(client: openai.OpenAI, sleeps: Sleeps) -> LLM:
    return LLM(client, retry=NO_JITTER, sleep=sleeps, now=lambda: NOW)


def test_complete_sends_checked_params_and_reads_the_reply(llm: LLM, chat: ChatServer) -> None:
    done = llm.complete(model=MODEL, messages=MESSAGES, temperature=0.5, top_k=40)
    assert isinstance(done, Completion)
    assert done.text.startswith("Reply #1")
    assert done.message == {"role": "assistant", "content": done.text}
    assert done.usage.reported
    assert done.usage.prompt_tokens == chat.count_tokens(MESSAGES)
    assert (done.attempts, done.request_id, done.complete) == (1, "req_1", True)
    body = chat.chat_requests[0].body
    assert (body["temperature"], body["top_k"]) == (0.5, 40)
    assert "stream" not in body


def test_bad_params_fail_before_any_request(llm: LLM, chat: ChatServer) -> None:
    with pytest.raises(ConfigurationError):
        llm.complete(model=MODEL, messages=MESSAGES, temperature=3)
    with pytest.raises(ConfigurationError):
        llm.stream(model=MODEL, messages=MESSAGES, n=3)
    assert chat.chat_requests == []


def test_stream_yields_pieces_and_assembles_the_reply(llm: LLM, chat: ChatServer) -> None:
    with llm.stream(model=MODEL, messages=MESSAGES) as stream:
        pieces = list(stream)
    done = stream.completion
    assert len(pieces) > 1
    assert "".join(pieces) == done.text == stream.partial_text
    assert done.complete
    assert done.finish_reason == "stop"
    assert done.usage.reported
    assert done.usage.completion_tokens == chat.count_text(done.text)
    body = chat.chat_requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_streamed_tool_calls_are_assembled(client: openai.OpenAI, chat: ChatServer) -> None:
    call = {"id": "call_1", "function": {"name": "lookup", "arguments": {"q": "a long query"}}}
    chat.reply = {"content": None, "tool_calls": [call]}
    try:
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
        stream = LLM(client).stream(model=MODEL, messages=MESSAGES, tools=tools)
        assert list(stream) == []
        done = stream.completion
    finally:
        chat.reply = None
    assert done.complete
    assert done.finish_reason == "tool_calls"
    assert done.message["content"] is None
    [assembled] = done.message["tool_calls"]
    assert assembled["id"] == "call_1"
    assert assembled["function"]["name"] == "lookup"
    assert json.loads(assembled["function"]["arguments"]) == {"q": "a long query"}
    assert chat.chat_requests[0].body["tools"] == tools


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_retryable_status_then_success(
    llm: LLM, chat: ChatServer, sleeps: Sleeps, status: int
) -> None:
    chat.fail(Fault.status(status))
    done = llm.complete(model=MODEL, messages=MESSAGES)
    assert done.attempts == 2
    assert len(chat.chat_requests) == 2
    assert sleeps == [0.5]


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequest), (401, AuthenticationFailed), (403, AuthenticationFailed),
     (404, BadRequest), (422, BadRequest)],
)  # fmt: skip
def test_non_retryable_status_is_sent_once(
    llm: LLM, chat: ChatServer, sleeps: Sleeps, status: int, cls: type
) -> None:
    chat.fail(Fault.status(status), times=3)
    with pytest.raises(cls) as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert (info.value.status, info.value.attempts, info.value.request_id) == (status, 1, "req_1")
    assert len(chat.chat_requests) == 1
    assert sleeps == []


def test_attempts_never_exceed_the_policy(client: openai.OpenAI, chat: ChatServer) -> None:
    for attempts in (1, 3):
        chat.reset()
        sleeps = Sleeps()
        llm = LLM(client, retry=RetryPolicy(attempts=attempts, jitter=0), sleep=sleeps)
        chat.fail(Fault.status(503), times=10)
        with pytest.raises(ServerError) as info:
            llm.complete(model=MODEL, messages=MESSAGES)
        assert info.value.attempts == attempts
        assert info.value.status == 503
        assert f"after {attempts} attempts" in str(info.value)
        assert len(chat.chat_requests) == attempts
        assert sleeps == [0.5, 1.0][: attempts - 1]


def test_jittered_waits_stay_within_the_fraction(client: openai.OpenAI, chat: ChatServer) -> None:
    sleeps = Sleeps()
    llm = LLM(client, retry=RetryPolicy(jitter=0.5), sleep=sleeps)
    chat.fail(Fault.status(500), times=3)
    llm.complete(model=MODEL, messages=MESSAGES)
    for wait, backoff in zip(sleeps, [0.5, 1.0, 2.0], strict=True):
        assert backoff * 0.5 <= wait <= backoff


@pytest.mark.parametrize(
    ("fault", "wait"),
    [
        (Fault.status(429, retry_after=2), 2.0),
        (Fault.status(429, retry_after_ms=1500, retry_after=9), 1.5),
        (Fault.status(503, retry_after=0.1), 0.5),  # backoff is longer
        (Fault.status(429, retry_after=500), 60.0),  # capped
        (Fault.status(429, retry_after_date=datetime.fromtimestamp(NOW + 7, UTC)), 7.0),
    ],
)
def test_retry_after_is_honoured_and_capped(
    llm: LLM, chat: ChatServer, sleeps: Sleeps, fault: Fault, wait: float
) -> None:
    chat.fail(fault)
    assert llm.complete(model=MODEL, messages=MESSAGES).attempts == 2
    assert sleeps == [wait]


def test_a_wait_past_the_deadline_gives_up_at_once(client: openai.OpenAI, chat: ChatServer) -> None:
    sleeps = Sleeps()
    policy = RetryPolicy(deadline=30, retry_after_cap=120, jitter=0)
    llm = LLM(client, retry=policy, sleep=sleeps)
    chat.fail(Fault.status(429, retry_after=45), times=2)
    with pytest.raises(RateLimited) as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert (info.value.attempts, info.value.status) == (1, 429)
    assert "deadline" in str(info.value)
    assert sleeps == []
    assert len(chat.chat_requests) == 1


def test_the_injected_clock_drives_the_deadline(client: openai.OpenAI, chat: ChatServer) -> None:
    """Waits count against the deadline: a fake clock advanced by the fake sleep."""
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    policy = RetryPolicy(attempts=10, initial=4, jitter=0, deadline=10)
    llm = LLM(client, retry=policy, sleep=sleep, clock=lambda: clock[0])
    chat.fail(Fault.status(500), times=10)
    with pytest.raises(ServerError) as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    # waits 4 (t=4), then 8 would end at 12 > 10: stop after 2 attempts
    assert info.value.attempts == 2
    assert clock[0] == 4


def test_deadline_cuts_a_drip_fed_stream(client: openai.OpenAI, chat: ChatServer) -> None:
    llm = LLM(client, retry=RetryPolicy(deadline=0.5, jitter=0))
    chat.fail(Fault.drip(0.15))
    started = time.monotonic()
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    pieces = []
    with pytest.raises(ModelTimeout) as info:
        pieces.extend(stream)
    assert time.monotonic() - started < 1.0
    assert pieces  # some text got through before the deadline
    assert info.value.attempts == 1
    assert stream.partial_text == "".join(pieces)
    assert not stream.completion.complete
    assert len(chat.chat_requests) == 1


@pytest.mark.parametrize("fault", [Fault.slow_first_byte(1.5), Fault.drip(0.05)])
def test_deadline_bounds_a_whole_reply(
    client: openai.OpenAI, chat: ChatServer, fault: Fault
) -> None:
    """A late first byte, or a body dripped 16 bytes at a time (~2 s in all)."""
    llm = LLM(client, retry=RetryPolicy(deadline=0.3))
    chat.fail(fault)
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match="deadline") as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert time.monotonic() - started < 1.0
    assert info.value.attempts == 1
    assert len(chat.chat_requests) == 1


def test_a_body_cut_short_is_retried(llm: LLM, chat: ChatServer, sleeps: Sleeps) -> None:
    chat.fail(Fault.abrupt_close())  # half the JSON body, then the socket closes
    assert llm.complete(model=MODEL, messages=MESSAGES).attempts == 2
    chat.fail(Fault.abrupt_close(), times=4)
    with pytest.raises(ConnectionFailed, match="lost the connection"):
        llm.complete(model=MODEL, messages=MESSAGES)


@pytest.mark.parametrize(
    "fault",
    [Fault.abrupt_close(after_chunks=1), Fault.abrupt_close(before_headers=True),
     Fault.status(503), Fault.sse_error(after_chunks=1)],
)  # fmt: skip
def test_stream_retries_before_the_first_piece(
    llm: LLM, chat: ChatServer, sleeps: Sleeps, fault: Fault
) -> None:
    chat.fail(fault)
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    text = "".join(stream)
    assert text.startswith("Reply #")
    assert stream.completion.complete
    assert stream.completion.attempts == 2
    assert len(chat.chat_requests) == 2
    assert sleeps == [0.5]


@pytest.mark.parametrize(
    ("fault", "cls"),
    [(Fault.abrupt_close(after_chunks=3), ConnectionFailed), (Fault.sse_error(), ServerError)],
)
def test_stream_never_retries_after_the_first_piece(
    llm: LLM, chat: ChatServer, sleeps: Sleeps, fault: Fault, cls: type
) -> None:
    chat.fail(fault)
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    pieces = []
    with pytest.raises(cls) as info:
        pieces.extend(stream)
    assert pieces
    assert info.value.attempts == 1
    assert info.value.request_id == "req_1"
    assert stream.partial_text == "".join(pieces)
    assert not stream.completion.complete
    assert list(stream) == []  # a broken stream stays ended
    assert len(chat.chat_requests) == 1
    assert sleeps == []


@pytest.mark.parametrize("done", [False, True])
def test_a_cut_stream_is_incomplete_without_an_exception(
    llm: LLM, chat: ChatServer, done: bool
) -> None:
    chat.fail(Fault.cut_stream(3, done=done))
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    text = "".join(stream)
    completion = stream.completion
    assert text
    assert completion.text == text
    assert not completion.complete
    assert completion.finish_reason is None
    assert completion.usage == Usage(None, None, None, reported=False)
    assert len(chat.chat_requests) == 1


def test_abandoned_streams_are_incomplete(llm: LLM, chat: ChatServer) -> None:
    # break out of the loop
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    first = ""
    for piece in stream:
        first = piece
        break
    assert stream.partial_text == first
    assert list(stream) == []  # leaving the loop ended the reply
    assert stream.completion.text == first
    assert not stream.completion.complete
    # close() between reads
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    next(stream)
    stream.close()
    assert not stream.completion.complete
    # leaving a with block
    with llm.stream(model=MODEL, messages=MESSAGES) as stream:
        next(stream)
    assert not stream.completion.complete
    # asking for the completion before the end
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    next(stream)
    assert not stream.completion.complete
    # closed before it started: no request at all
    unused = llm.stream(model=MODEL, messages=MESSAGES)
    unused.close()
    assert unused.completion is None
    assert list(unused) == []
    assert len(chat.chat_requests) == 4


def test_start_connects_early_and_keeps_the_first_piece(
    llm: LLM, chat: ChatServer, sleeps: Sleeps
) -> None:
    chat.fail(Fault.status(500))
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    stream.start()
    assert len(chat.chat_requests) == 2  # retried inside start()
    assert stream.partial_text  # the first piece is read, not yet handed out
    text = "".join(stream)
    assert text == stream.partial_text
    assert stream.completion is not None
    assert stream.completion.complete
    # an error before the reply begins is raised by start(), and there is no completion
    chat.fail(Fault.context_length("llamacpp"))
    stream = llm.stream(model=MODEL, messages=MESSAGES)
    with pytest.raises(ContextLengthExceeded):
        stream.start()
    assert stream.completion is None
    assert list(stream) == []
    assert sleeps == [0.5]


def test_keyboard_interrupt_abandons_the_stream(client: openai.OpenAI, chat: ChatServer) -> None:
    calls = [0]

    def clock() -> float:  # the stream reads the clock after every chunk
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return time.monotonic()

    stream = LLM(client, clock=clock).stream(model=MODEL, messages=MESSAGES)
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    assert not stream.completion.complete
    assert stream.partial_text


@pytest.mark.parametrize("fault", [Fault.malformed_json(), Fault.not_json()])
def test_malformed_replies(llm: LLM, chat: ChatServer, fault: Fault) -> None:
    chat.fail(fault)
    with pytest.raises(MalformedResponse) as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert (info.value.attempts, info.value.request_id) == (1, "req_1")
    chat.fail(fault)
    with pytest.raises(MalformedResponse):
        list(llm.stream(model=MODEL, messages=MESSAGES))
    assert len(chat.chat_requests) == 2


def test_error_object_in_a_200_reply(llm: LLM, chat: ChatServer) -> None:
    chat.fail(Fault.sse_error("upstream exploded"))  # non-stream: 200 {"error": ...}
    assert llm.complete(model=MODEL, messages=MESSAGES).attempts == 2
    chat.fail(Fault.sse_error("upstream exploded"), times=4)
    with pytest.raises(ServerError, match="upstream exploded") as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert info.value.attempts == 4


@pytest.mark.parametrize("style", ["openai", "llamacpp", "llama-cpp-python"])
def test_context_length_in_each_servers_words(llm: LLM, chat: ChatServer, style: str) -> None:
    chat.fail(Fault.context_length(style, limit=1000))  # type: ignore[arg-type]
    with pytest.raises(ContextLengthExceeded) as info:
        llm.complete(model=MODEL, messages=MESSAGES)
    assert info.value.limit == 1000
    assert info.value.requested == chat.count_tokens(MESSAGES)
    assert (info.value.status, info.value.attempts) == (400, 1)
    assert len(chat.chat_requests) == 1


def test_real_overflow_is_context_length(llm: LLM, chat: ChatServer) -> None:
    long = [{"role": "user", "content": "word " * 4000}]
    with pytest.raises(ContextLengthExceeded) as info:
        llm.complete(model=MODEL, messages=long)
    assert info.value.limit == chat.window
    assert info.value.requested == chat.count_tokens(long)


def test_unreachable_server_is_connection_failed(sleeps: Sleeps) -> None:
    with ChatServer() as gone:
        base_url = gone.base_url
    with openai.OpenAI(api_key="k", base_url=base_url, max_retries=0) as client:
        llm = LLM(client, retry=RetryPolicy(attempts=2, jitter=0), sleep=sleeps)
        with pytest.raises(ConnectionFailed, match="could not reach") as info:
            llm.complete(model=MODEL, messages=MESSAGES)
    assert info.value.attempts == 2
    assert sleeps == [0.5]


# --- async -------------------------------------------------------------------------------


def _run_async(chat: ChatServer, sleeps: Sleeps, body: Any) -> Any:
    async def main() -> Any:
        async with chat.async_client() as client:
            llm = AsyncLLM(client, retry=NO_JITTER, sleep=sleeps.asleep, now=lambda: NOW)
            return await body(llm)

    return asyncio.run(main())


def test_async_complete_retries_and_maps(chat: ChatServer, sleeps: Sleeps) -> None:
    async def body(llm: AsyncLLM) -> None:
        chat.fail(Fault.status(429, retry_after=3))
        chat.fail(Fault.status(500))
        done = await llm.complete(model=MODEL, messages=MESSAGES)
        assert (done.attempts, done.complete) == (3, True)
        chat.fail(Fault.status(401))
        with pytest.raises(AuthenticationFailed):
            await llm.complete(model=MODEL, messages=MESSAGES)
        chat.fail(Fault.context_length("llamacpp", limit=99))
        with pytest.raises(ContextLengthExceeded) as info:
            await llm.complete(model=MODEL, messages=MESSAGES)
        assert info.value.limit == 99
        chat.fail(Fault.not_json())
        with pytest.raises(MalformedResponse):
            await llm.complete(model=MODEL, messages=MESSAGES)

    _run_async(chat, sleeps, body)
    assert sleeps == [3.0, 1.0]
    assert len(chat.chat_requests) == 6


def test_async_stream_cases(chat: ChatServer, sleeps: Sleeps) -> None:
    async def body(llm: AsyncLLM) -> None:
        # whole, after a retry before the first piece
        chat.fail(Fault.abrupt_close(after_chunks=1))
        stream = llm.stream(model=MODEL, messages=MESSAGES)
        text = "".join([piece async for piece in stream])
        assert stream.completion.text == text
        assert stream.completion.complete
        assert stream.completion.usage.reported
        assert stream.completion.attempts == 2
        # an error after the first piece is not retried
        chat.fail(Fault.sse_error())
        stream = llm.stream(model=MODEL, messages=MESSAGES)
        with pytest.raises(ServerError):
            async for _ in stream:
                pass
        assert stream.partial_text
        assert not stream.completion.complete
        # cut: no exception, incomplete
        chat.fail(Fault.cut_stream(2))
        stream = llm.stream(model=MODEL, messages=MESSAGES)
        assert [piece async for piece in stream]
        assert not stream.completion.complete
        # abandoned by leaving the block
        async with llm.stream(model=MODEL, messages=MESSAGES) as stream:
            async for _ in stream:
                break
        assert not stream.completion.complete
        # start() raises what comes before the reply; then there is no completion
        chat.fail(Fault.context_length("openai", limit=50))
        stream = llm.stream(model=MODEL, messages=MESSAGES)
        with pytest.raises(ContextLengthExceeded):
            await stream.start()
        assert stream.completion is None

    _run_async(chat, sleeps, body)
    assert sleeps == [0.5]
    assert len(chat.chat_requests) == 6


def test_async_deadline_cuts_a_drip_fed_stream(chat: ChatServer) -> None:
    async def main() -> None:
        async with chat.async_client() as client:
            llm = AsyncLLM(client, retry=RetryPolicy(deadline=0.4))
            chat.fail(Fault.drip(0.15))
            stream = llm.stream(model=MODEL, messages=MESSAGES)
            with pytest.raises(ModelTimeout):
                async for _ in stream:
                    pass
            assert not stream.completion.complete

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 1.0
