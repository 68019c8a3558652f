"""AsyncMemory / AsyncConversation against a real model server, mirroring test_chat.py.

Everything goes through the real ``openai.AsyncOpenAI`` over HTTP to
``conversation_memory.testing.ChatServer``. pytest-asyncio is not a
dependency: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa

from conversation_memory import (
    AuthenticationFailed,
    ConfigurationError,
    ContextLengthExceeded,
    ConversationNotFound,
    Correction,
    ServerError,
    register_model,
)
from conversation_memory.aio import AsyncConversation, AsyncMemory
from conversation_memory.llm import RetryPolicy
from conversation_memory.testing import ChatServer, Fault, RecordingSummarizer, refusals

MODEL = "test-model"
SUMMARY_HEADER = "Summary of the earlier conversation"


@pytest.fixture(scope="module", autouse=True)
def _test_model():
    register_model(MODEL, window=1000, max_output=200)


@pytest.fixture
def server():
    with ChatServer(window=1000, model=MODEL) as server:
        yield server


async def no_sleep(_seconds: float) -> None:
    return None


@asynccontextmanager
async def open_memory(path, server, **options) -> AsyncIterator[AsyncMemory]:
    client = server.async_client()
    try:
        async with AsyncMemory(
            path,
            client=client,
            model=MODEL,
            sleep=no_sleep,
            retry=RetryPolicy(attempts=3),
            **options,
        ) as memory:
            yield memory
    finally:
        await client.close()


def rows(memory: AsyncMemory, table: str) -> list:
    with memory.database.engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT * FROM {table}")))


def test_send_stores_the_turn_and_its_usage(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation(system="Be brief.")
            assert isinstance(chat, AsyncConversation)
            reply = await chat.send("Hello there", max_tokens=50)
            assert reply.text.startswith("Reply #1")
            assert reply.complete
            assert reply.finish_reason == "stop"
            sent = server.chat_requests[0].body
            assert reply.usage.prompt_tokens == server.count_tokens(sent["messages"])
            assert sent["messages"] == [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
            ]
            assert sent["max_tokens"] == 50
            assert await chat.history() == [
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": reply.text},
            ]
            (usage,) = rows(memory, "usage")
            assert usage.kind == "chat"
            assert usage.prompt_tokens == reply.usage.prompt_tokens
            totals = await chat.usage()
            assert totals.calls == 1
            assert totals.completion_tokens == reply.usage.completion_tokens

    asyncio.run(main())


def test_a_failed_call_stores_nothing_and_retries_as_configured(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            await chat.send("first")
            server.fail(Fault.status(500), times=3)
            with pytest.raises(ServerError):
                await chat.send("second")
            assert len(server.chat_requests) == 4  # 1 + 3 attempts, never more
            assert (await chat.history())[0]["content"] == "first"
            assert len(await chat.history()) == 2
            server.fail(Fault.status(401))
            with pytest.raises(AuthenticationFailed, match="OPENAI_API_KEY"):
                await chat.send("third")
            assert len(await chat.history()) == 2
            assert [u.error for u in rows(memory, "usage")] == [None]

    asyncio.run(main())


def test_params_are_checked_before_any_request(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            with pytest.raises(ConfigurationError, match="temperature"):
                await chat.send("hi", temperature=3)
            with pytest.raises(ConfigurationError, match="max_tokens"):
                chat.stream("hi", max_tokens=10_000)
            with pytest.raises(ConfigurationError, match="on_incomplete"):
                chat.stream("hi", on_incomplete="keep")
            assert server.chat_requests == []
            assert await chat.history() == []

    asyncio.run(main())


def test_stream_stores_the_reply_once_at_the_end(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            stream = chat.stream("Tell me a story")
            pieces = [piece async for piece in stream]
            assert len(pieces) > 1
            assert stream.reply is not None
            assert stream.reply.complete
            assert (await chat.history())[-1] == {"role": "assistant", "content": "".join(pieces)}
            assert rows(memory, "messages")[-1].complete
            assert len(rows(memory, "usage")) == 1
            await stream.aclose()  # already stored: closing again stores nothing more
            assert len(await chat.history()) == 2

    asyncio.run(main())


def test_awaiting_a_stream_connects_it_and_raises_errors_there(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            server.fail(Fault.status(401))
            with pytest.raises(AuthenticationFailed):
                await chat.stream("hello")
            assert await chat.history() == []
            stream = await chat.stream("hello")
            assert len(server.chat_requests) == 2  # connected before the first read
            text = "".join([piece async for piece in stream])
            assert (await chat.history())[-1]["content"] == text

    asyncio.run(main())


def test_a_cut_stream_is_stored_as_incomplete(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            server.fail(Fault.cut_stream(after_chunks=2))
            pieces = [piece async for piece in chat.stream("Tell me a story")]
            entries = await chat.entries()
            assert [e.message["role"] for e in entries] == ["user", "assistant"]
            assert entries[-1].message["content"] == "".join(pieces)
            assert entries[-1].complete is False

    asyncio.run(main())


def test_an_abandoned_stream_is_stored_once_as_incomplete_or_dropped(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            async with chat.stream("Tell me a story") as stream:
                async for _piece in stream:
                    break
            assert [e.complete for e in await chat.entries()] == [True, False]
            assert stream.reply is not None
            assert not stream.reply.complete

            closed = await memory.conversation()
            stream = closed.stream("Tell me a story")
            async for _piece in stream:
                break
            await stream.aclose()
            await stream.aclose()  # once only
            assert [e.complete for e in await closed.entries()] == [True, False]

            dropped = await memory.conversation()
            async with dropped.stream("again", on_incomplete="drop") as stream:
                await anext(stream)
            assert await dropped.history() == []
            assert stream.reply is None

            never = await memory.conversation()
            requests = len(server.chat_requests)
            await never.stream("unread").aclose()  # never connected: nothing sent or stored
            assert len(server.chat_requests) == requests
            assert await never.history() == []

    asyncio.run(main())


def test_a_loop_left_early_is_abandoned_without_aclose(tmp_path, server):
    """Like leaving a ``for`` over a sync stream: asyncio finalizes the loop's iterator."""

    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            stream = chat.stream("Tell me a story")
            async for _piece in stream:
                break
            for _ in range(200):
                if stream.reply is not None:
                    break
                await asyncio.sleep(0.01)
            assert [e.complete for e in await chat.entries()] == [True, False]

    asyncio.run(main())


def test_bring_your_own_client_tool_loop(tmp_path, server):
    call = {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]

    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            async with server.async_client() as client:
                server.reply = {"tool_calls": [call]}
                messages = await chat.prepare("Weather in Oslo?", tools=tools)
                completion = await client.chat.completions.create(
                    model=MODEL, messages=messages, tools=tools
                )
                recorded = await chat.record(completion)
                assert recorded.tool_calls
                call_id = recorded.tool_calls[0]["id"]
                server.reply = None
                messages = await chat.prepare(
                    {"role": "tool", "tool_call_id": call_id, "content": "-3C"}
                )
                assert messages[-1]["role"] == "tool"
                completion = await client.chat.completions.create(model=MODEL, messages=messages)
                await chat.record(completion.model_dump())
            roles = [m["role"] for m in await chat.history()]
            assert roles == ["user", "assistant", "tool", "assistant"]
            assert server.rejections == []

    asyncio.run(main())


def test_long_conversation_stays_inside_a_small_window(tmp_path, server):
    """100 turns, 1,000-token window, a tokenizer that isn't ours: every request fits."""
    summarizer = RecordingSummarizer()

    async def main():
        async with open_memory(
            tmp_path / "c.db", server, strategy="summary", summarizer=summarizer
        ) as memory:
            chat = await memory.conversation(system="You are a helpful assistant.")
            for turn in range(100):
                await chat.send(
                    f"Turn {turn}: my favourite number today is {turn * 7}.", max_tokens=60
                )
            assert server.rejections == []
            chats = [r for r in server.chat_requests if r.status == 200]
            assert {r.status for r in server.chat_requests} <= {200, 400}
            assert any(SUMMARY_HEADER in json.dumps(r.body["messages"]) for r in chats[-10:])
            assert len(await chat.history()) == 200
            assert summarizer.calls
            assert rows(memory, "summaries")
            overflows = [r for r in server.chat_requests if r.status == 400]
            assert len(overflows) <= 3, "calibration learns the server's tokenizer quickly"

    asyncio.run(main())


def test_the_default_summarizer_calls_the_model_through_the_async_client(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server, strategy="summary") as memory:
            chat = await memory.conversation()
            for turn in range(30):
                await chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
            summaries = rows(memory, "summaries")
            assert summaries
            assert {s.prompt_version for s in summaries} == {"rolling-v1"}
            kinds = [u.kind for u in rows(memory, "usage")]
            assert kinds.count("summary") == len(summaries)
            assert server.rejections == []

    asyncio.run(main())


def test_failed_summarization_answers_with_truncation_and_changes_nothing(tmp_path, server):
    summarizer = RecordingSummarizer()

    async def main():
        async with open_memory(
            tmp_path / "c.db", server, strategy="summary", summarizer=summarizer
        ) as memory:
            chat = await memory.conversation()
            summarizer.fail_next(1000)
            for turn in range(40):
                await chat.send(f"message number {turn} " + "word " * 20, max_tokens=30)
            assert rows(memory, "summaries") == []
            failures = [u for u in rows(memory, "usage") if u.kind == "summary"]
            assert failures
            assert all(u.error for u in failures)
            assert rows(memory, "compaction_leases") == []  # every lease was dropped
            before = await chat.export()
            outcome = await chat.compact()
            assert outcome.error
            assert await chat.export() == before
            summarizer.recover()
            await chat.send("one more", max_tokens=30)
            assert rows(memory, "summaries")
            assert len(await chat.history()) == 82

    asyncio.run(main())


@dataclass
class LoopSummarizer:
    """An async summarizer that notes which thread each call ran on."""

    inner: RecordingSummarizer = field(default_factory=RecordingSummarizer)
    threads: set[int] = field(default_factory=set)
    model: str = "loop-summarizer"

    async def summarize(self, previous, messages, *, max_tokens):
        self.threads.add(threading.get_ident())
        await asyncio.sleep(0)  # other tasks run meanwhile
        return self.inner.summarize(previous, messages, max_tokens=max_tokens)


def test_concurrent_turns_on_two_conversations_with_async_compaction(tmp_path, server):
    summarizer = LoopSummarizer()

    async def main():
        async with open_memory(
            tmp_path / "c.db", server, strategy="summary", summarizer=summarizer
        ) as memory:
            first, second = await asyncio.gather(
                memory.conversation(user="ann"), memory.conversation(user="bob")
            )

            async def talk(chat: AsyncConversation, name: str) -> None:
                for turn in range(15):
                    await chat.send(f"{name} says {turn} " + "word " * 25, max_tokens=30)

            await asyncio.gather(talk(first, "ann"), talk(second, "bob"))
            for chat, name in ((first, "ann"), (second, "bob")):
                history = await chat.history()
                assert [m["content"].split(" word")[0] for m in history[::2]] == [
                    f"{name} says {turn}" for turn in range(15)
                ]
                assert (await chat.usage()).summary_calls >= 1
            summaries = rows(memory, "summaries")
            assert {s.conversation_id for s in summaries} == {first.id, second.id}
            assert server.rejections == []
        assert summarizer.threads == {threading.get_ident()}, "async summarizers run on the loop"

    asyncio.run(main())


def test_store_methods_mirror_the_sync_api(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation(user="ann", title="notes")
            await chat.append({"role": "user", "content": "hello"})
            await chat.extend(
                [
                    {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": "bye"},
                ]
            )
            context = await chat.context()
            assert [m["content"] for m in context.messages] == ["hello", "hi", "bye"]
            assert [e.position for e in await chat.entries()] == [0, 1, 2]
            child = await chat.fork(at=0, title="branch")
            assert await child.history() == [{"role": "user", "content": "hello"}]
            assert {c.id for c in await memory.conversations(user="ann")} == {chat.id, child.id}
            resumed = await memory.conversation(chat.id, user="ann")
            assert await resumed.history() == await chat.history()
            copy = await memory.import_conversation(await chat.export(), new_id=True)
            assert await copy.history() == await chat.history()
            await chat.delete()
            with pytest.raises(ConversationNotFound):
                await memory.conversation(chat.id, user="ann")
            assert await memory.erase_user("ann") >= 1
            assert await memory.conversations(user="ann") == []

    asyncio.run(main())


def test_opening_and_closing(tmp_path, server):
    async def main():
        memory = AsyncMemory(tmp_path / "c.db", model=MODEL)
        with pytest.raises(ConfigurationError, match="not open"):
            await memory.conversation()
        with pytest.raises(ConfigurationError, match="compaction"):
            AsyncMemory(tmp_path / "c.db", compaction="sometimes")
        # No client given: one is built from the environment, and aclose() closes it.
        env = {"OPENAI_BASE_URL": server.base_url}
        memory = await AsyncMemory.open(tmp_path / "c.db", model=MODEL, env=env)
        try:
            chat = await memory.conversation()
            reply = await chat.send("hello")
            assert reply.complete
        finally:
            await memory.aclose()
        with pytest.raises(ConfigurationError, match="closed"):
            await memory.conversation()
        await memory.aclose()

    asyncio.run(main())


def test_a_context_length_error_calibrates_and_refits_once(tmp_path, server):
    async def main():
        async with open_memory(tmp_path / "c.db", server) as memory:
            chat = await memory.conversation()
            server.fail(Fault.context_length())
            reply = await chat.send("hello", max_tokens=20)
            assert reply.complete
            assert [r.status for r in server.chat_requests] == [400, 200]
            # The 400's claim served the retry only; the reply's usage (the prompt as we
            # counted it) is what is kept.
            assert await chat.correction() == Correction()
            server.fail(Fault.context_length(), times=2)
            with pytest.raises(ContextLengthExceeded):
                await chat.stream("again", max_tokens=20)
            assert len(await chat.history()) == 2  # the failed turn stored nothing
            assert await chat.correction() == Correction()
            # A claim no prompt of this size could make is capped: the retry still fits.
            server.fail(Fault.status(400, body=refusals.openai_context_body(1500, 90000, 0)))
            assert (await chat.send("and again", max_tokens=20)).complete
            assert len(await chat.history()) == 4

    asyncio.run(main())
