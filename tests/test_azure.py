"""Azure OpenAI through the real ``AzureOpenAI`` client, over real HTTP to ``ChatServer``.

An Azure client sends to ``/openai/deployments/{deployment}/chat/completions
?api-version=...`` with an ``api-key`` header, and the model name it carries
is the deployment's (``prod-gpt4o``), registered ``like="gpt-4o"`` so that
counting and the window are gpt-4o's. Azure adds content-filter fields to its
replies; a reply its filter stopped (``finish_reason="content_filter"``) must
be stored as incomplete, never as a normal answer, and never as a summary.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from conversation_memory import AsyncMemory, Memory, register_model
from conversation_memory.errors import AuthenticationFailed, BadRequest, ConfigurationError
from conversation_memory.llm import RetryPolicy
from conversation_memory.testing import ChatServer, Fault
from conversation_memory.testing.replies import is_summarization

DEPLOYMENT = "prod-gpt4o"
SERVED = "gpt-4o-2024-08-06"
API_VERSION = "2024-10-21"
PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"

register_model(DEPLOYMENT, like="gpt-4o")


@pytest.fixture
def key() -> str:
    return secrets.token_hex(16)  # Azure keys are 32 hex digits


@pytest.fixture
def server(key: str) -> Iterator[ChatServer]:
    with ChatServer(deployments={DEPLOYMENT: SERVED}, api_key=key, window=128_000) as server:
        yield server
        assert server.errors == []


@pytest.fixture
def client(server: ChatServer, key: str) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(
        azure_endpoint=server.azure_endpoint, api_key=key, api_version=API_VERSION
    ) as client:
        yield client


def memory(db: str, client: Any, **options: Any) -> Memory:
    return Memory(db, client=client, model=DEPLOYMENT, **options)


def test_the_server_speaks_azures_wire_format(server, client, key) -> None:
    done = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}]
    )
    assert done.model == SERVED
    assert done.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    results = done.choices[0].model_extra["content_filter_results"]
    assert results["violence"] == {"filtered": False, "severity": "safe"}
    (request,) = server.chat_requests
    assert request.path == PATH
    assert request.headers["api-key"] == key
    assert "authorization" not in request.headers

    chunks = list(
        client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
    )
    assert chunks[0].choices == []
    assert chunks[0].model_extra["prompt_filter_results"]
    assert chunks[-1].choices[0].finish_reason == "stop"

    server.fail(Fault.content_filter("hate"))
    stopped = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi there, how are you?"}]
    )
    assert stopped.choices[0].finish_reason == "content_filter"
    hate = stopped.choices[0].model_extra["content_filter_results"]["hate"]
    assert hate["filtered"] is True

    with (
        openai.AzureOpenAI(
            azure_endpoint=server.azure_endpoint, api_key="wrong", api_version=API_VERSION
        ) as wrong,
        pytest.raises(openai.AuthenticationError) as denied,
    ):
        wrong.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}])
    assert denied.value.body["code"] == "401"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "DeploymentNotFound"
    no_version = openai.OpenAI(
        base_url=f"{server.azure_endpoint}/openai/deployments/{DEPLOYMENT}",
        api_key=key,
        default_headers={"api-key": key},
    )
    with no_version, pytest.raises(openai.NotFoundError) as unversioned:
        no_version.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}]
        )
    assert unversioned.value.body == {"code": "404", "message": "Resource not found"}


def test_deployments_must_map_names_to_models() -> None:
    for wrong in (["prod-gpt4o"], {"prod-gpt4o": 4}):
        with pytest.raises(ConfigurationError, match="deployments"):
            ChatServer(deployments=wrong)  # type: ignore[arg-type]


def test_send_through_an_azure_deployment(server, client, tmp_path) -> None:
    with memory(str(tmp_path / "azure.db"), client) as mem:
        chat = mem.conversation(system="You are terse.")
        assert chat.budget().window == 128_000  # gpt-4o's, through like="gpt-4o"
        reply = chat.send("Hello from Azure!", max_tokens=100)
        assert reply.complete
        assert (reply.finish_reason, reply.model) == ("stop", SERVED)
        assert [m["role"] for m in chat.history()] == ["user", "assistant"]
        (call,) = chat.calls()
        assert call.model == SERVED
        assert call.cost is not None  # the served snapshot prices as gpt-4o
    assert [r.path for r in server.chat_requests] == [PATH]


def test_stream_through_an_azure_deployment(server, client, tmp_path) -> None:
    with memory(str(tmp_path / "azure.db"), client) as mem:
        chat = mem.conversation()
        with chat.stream("Tell me a story.") as stream:
            text = "".join(stream)
        assert stream.reply is not None
        assert stream.reply.complete
        assert stream.reply.text == text
        assert chat.history()[-1] == {"role": "assistant", "content": text}
    assert server.chat_requests[0].body["stream"] is True


def test_summaries_through_an_azure_deployment(server, client, tmp_path) -> None:
    with memory(str(tmp_path / "azure.db"), client, strategy="summary", compaction="manual") as mem:
        chat = mem.conversation(budget=300)
        chat.extend(
            {"role": role, "content": f"message {n}: " + "words " * 20}
            for n, role in zip(range(30), ["user", "assistant"] * 15, strict=True)
        )
        outcome = chat.compact()
        assert outcome.error is None
        assert outcome.summaries
        summaries = [r for r in server.chat_requests if is_summarization(r.body)]
        assert summaries
        assert {r.path for r in summaries} == {PATH}
        assert chat.context().messages[0]["content"].startswith("Summary of the earlier")


def test_a_429_waits_as_retry_after_ms_asks(server, client, tmp_path) -> None:
    slept: list[float] = []
    server.fail(Fault.status(429, retry_after_ms=1500))
    with memory(
        str(tmp_path / "azure.db"), client, retry=RetryPolicy(jitter=0), sleep=slept.append
    ) as mem:
        reply = mem.conversation().send("Hello?")
    assert reply.complete
    assert slept == [1.5]  # the server's 1,500 ms, not the 0.5 s backoff
    assert [r.status for r in server.chat_requests] == [429, 200]


def test_a_429_that_outlasts_the_retries_says_so(server, client, tmp_path) -> None:
    server.fail(Fault.status(429, retry_after_ms=10), times=2)
    with memory(
        str(tmp_path / "azure.db"), client, retry=RetryPolicy(attempts=2), sleep=lambda s: None
    ) as mem:
        chat = mem.conversation()
        with pytest.raises(Exception, match="rate limited") as caught:
            chat.send("Hello?")
        assert chat.history() == []
    assert caught.value.status == 429
    assert "exceeded token rate limit" in str(caught.value)  # Azure's own words


@pytest.mark.parametrize("streamed", [False, True])
def test_a_reply_stopped_by_the_content_filter_is_stored_as_such(
    server, client, tmp_path, streamed
) -> None:
    with memory(str(tmp_path / "azure.db"), client) as mem:
        chat = mem.conversation()
        chat.send("A first, harmless question.")
        server.fail(Fault.content_filter())
        if streamed:
            with chat.stream("Something the filter stops.") as stream:
                "".join(stream)
            reply = stream.reply
        else:
            reply = chat.send("Something the filter stops.")
        assert reply is not None
        assert reply.finish_reason == "content_filter"
        assert not reply.complete
        last = chat.entries()[-1]
        assert last.message["role"] == "assistant"
        assert not last.complete
        call = chat.calls()[-1]
        assert call.finish_reason == "content_filter"
        assert "content filter" in call.error
        # A dropped incomplete stream is not stored at all, never stored as complete.
        server.fail(Fault.content_filter())
        before = len(chat)
        with chat.stream("Again.", on_incomplete="drop") as dropped:
            "".join(dropped)
        assert dropped.reply is None
        assert len(chat) == before


def test_a_summary_stopped_by_the_content_filter_is_not_stored(server, client, tmp_path) -> None:
    with memory(str(tmp_path / "azure.db"), client, strategy="summary", compaction="manual") as mem:
        chat = mem.conversation(budget=300)
        chat.extend(
            {"role": role, "content": f"message {n}: " + "words " * 20}
            for n, role in zip(range(30), ["user", "assistant"] * 15, strict=True)
        )
        server.fail(Fault.content_filter())
        outcome = chat.compact()
        assert outcome.summaries == ()
        assert "content filter" in outcome.error
        assert chat.summary_cover() == []
        assert "content filter" in chat.calls()[-1].error


def test_errors_through_an_azure_client_name_the_problem(server, tmp_path) -> None:
    with (
        openai.AzureOpenAI(
            azure_endpoint=server.azure_endpoint, api_key="wrong-key", api_version=API_VERSION
        ) as wrong,
        memory(str(tmp_path / "azure.db"), wrong) as mem,
    ):
        with pytest.raises(AuthenticationFailed, match="refused the credentials"):
            mem.conversation().send("Hello?")
        register_model("prod-missing", like="gpt-4o")
        with pytest.raises(BadRequest, match="deployment"):
            mem.conversation(model="prod-missing").send("Hello?")


def test_async_send_and_stream_through_an_azure_deployment(server, key, tmp_path) -> None:
    async def main() -> tuple[str, str]:
        async with (
            openai.AsyncAzureOpenAI(
                azure_endpoint=server.azure_endpoint, api_key=key, api_version=API_VERSION
            ) as client,
            AsyncMemory(str(tmp_path / "azure.db"), client=client, model=DEPLOYMENT) as mem,
        ):
            chat = await mem.conversation()
            reply = await chat.send("Hello!")
            async with chat.stream("And a story?") as stream:
                text = "".join([piece async for piece in stream])
            return reply.model, text

    served, text = asyncio.run(main())
    assert served == SERVED
    assert text
    assert {r.path for r in server.chat_requests} == {PATH}
