"""The async surface equals the sync one, by test.

1. Every public method and property of ``Memory`` / ``Conversation`` exists on
   ``AsyncMemory`` / ``AsyncConversation`` with the same parameters: a
   coroutine where the sync one does I/O, the same kind of member where it
   does not. The few deliberately sync-only members are listed with the reason.
2. A table of behaviours (send, stream, prepare/record, compact, fork,
   export, usage, calibration, search) run through both drivers against the real
   ``ChatServer`` stores the same rows: the same exports, histories, usage
   rows and summaries, once ids, timestamps and latencies are set aside.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conversation_memory import (
    AsyncConversation,
    AsyncMemory,
    Conversation,
    Memory,
    register_model,
)
from conversation_memory.testing import ChatServer, RecordingSummarizer

MODEL = "parity-model"

SYNC_ONLY = {
    "__len__": "len() cannot await: `len(await conversation.history())`",
    "__iter__": "iterating cannot await: `for m in await conversation.history()`",
    "__enter__": "`async with AsyncMemory(...)` opens and closes it (__aenter__/__aexit__)",
    "__exit__": "`async with AsyncMemory(...)` opens and closes it (__aenter__/__aexit__)",
}
"""Sync members the async twins have no equal of, and why."""

NO_IO = {"budget", "stream"}
"""Methods that do no I/O: plain methods on both sides (``stream`` returns a stream
that connects when it is first read, entered or awaited)."""

DUNDERS = {"__init__", "__len__", "__iter__", "__enter__", "__exit__"}
PAIRS = [(Memory, AsyncMemory), (Conversation, AsyncConversation)]


def public(cls: type) -> dict[str, Any]:
    """The public members a class defines (or inherits from the package's bases)."""
    return {
        name: inspect.getattr_static(cls, name)
        for name in dir(cls)
        if (not name.startswith("_") or name in DUNDERS) and hasattr(cls, name)
        if not (name in DUNDERS and getattr(cls, name) is getattr(object, name, None))
    }


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=["memory", "conversation"])
def test_every_sync_member_has_an_async_twin(sync: type, async_: type) -> None:
    mine, theirs = public(sync), public(async_)
    missing = sorted(set(mine) - set(theirs) - set(SYNC_ONLY))
    assert missing == [], f"{async_.__name__} lacks {missing}"
    for name, member in mine.items():
        if name in SYNC_ONLY:
            continue
        twin = theirs[name]
        if isinstance(member, property):
            assert isinstance(twin, property), f"{async_.__name__}.{name} is not a property"
            continue
        assert callable(member), name
        assert callable(twin), name
        if name == "__init__" and sync is Conversation:
            continue  # built by its memory, never by callers
        assert parameters(twin) == parameters(member), f"{name}: parameters differ"
        coroutine = inspect.iscoroutinefunction(twin)
        if name in NO_IO or name == "__init__":
            assert not coroutine, f"{async_.__name__}.{name} does no I/O: not a coroutine"
        else:
            assert coroutine, f"{async_.__name__}.{name} does I/O: it must be a coroutine"


def test_the_sync_only_list_is_short_and_true() -> None:
    for name in SYNC_ONLY:
        assert any(name in public(sync) for sync, _ in PAIRS), name
        assert all(name not in public(async_) for _, async_ in PAIRS), name


def attributes(instance: object) -> dict[str, Any]:
    return {k: v for k, v in vars(instance).items() if not k.startswith("_")}


def test_instances_carry_the_same_attributes(tmp_path: Path) -> None:
    options = {"model": "gpt-4o", "strategy": "summary", "compaction": "manual"}
    with Memory(tmp_path / "s.db", **options) as memory:
        sync_memory = attributes(memory)
        chat = memory.conversation(user="ann", system="Be brief.", title="t")
        sync_chat = attributes(chat) | {"id": None}

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with AsyncMemory(tmp_path / "a.db", **options) as memory:
            chat = await memory.conversation(user="ann", system="Be brief.", title="t")
            return attributes(memory), attributes(chat) | {"id": None}

    async_memory, async_chat = asyncio.run(main())
    assert async_memory == sync_memory
    assert set(sync_chat) == {"id", "user", "key", "title", "system", "model"}
    assert async_chat == sync_chat


# -- the same rows through both drivers -------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    register_model(MODEL, window=1000, max_output=200)


def plain_export(text: str) -> list[dict[str, Any]]:
    """An export without what differs between two runs: ids and times."""
    lines = [json.loads(line) for line in text.splitlines()]
    header, *messages = lines
    for key in ("id", "created_at", "updated_at"):
        header.pop(key)
    for message in messages:
        message["convmem"].pop("created_at")
    return [header, *messages]


def plain_calls(calls: list[Any]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in asdict(call).items() if k not in ("created_at", "latency_ms")}
        for call in calls
    ]


def summaries(database: Any, conversation_id: str) -> list[tuple[Any, ...]]:
    with database.engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.text(
                    "SELECT start_position, end_position, level, text, tokens, strategy, model, "
                    "prompt_version FROM summaries WHERE conversation_id = :id ORDER BY id"
                ),
                {"id": conversation_id},
            )
        ]


def plain_hits(hits: list[Any]) -> list[dict[str, Any]]:
    """Search hits without what differs between two runs: ids and times."""
    return [
        {k: v for k, v in asdict(hit).items() if k not in ("conversation_id", "created_at")}
        for hit in hits
    ]


TURNS = 14
"""Enough words past the 800-token budget that the summary strategy folds."""


def run_sync(path: Path, server: ChatServer) -> dict[str, Any]:
    with (
        server.client() as client,
        Memory(
            path,
            client=client,
            model=MODEL,
            strategy="summary",
            summarizer=RecordingSummarizer(),
            compaction="after",
        ) as memory,
    ):
        chat = memory.conversation(user="ann", system="Be brief.", title="parity")
        results: dict[str, Any] = {}
        results["send"] = chat.send("hello there", max_tokens=30).text
        with chat.stream("tell me a story", max_tokens=30) as stream:
            results["stream"] = "".join(stream)
        messages = chat.prepare("What is 2 + 2?", max_tokens=30)
        results["prepared"] = chat.prepared.report.total if chat.prepared else None
        completion = client.chat.completions.create(model=MODEL, messages=messages)
        results["record"] = chat.record(completion).position
        for n in range(TURNS):
            chat.send(f"message {n} " + "word " * 25, max_tokens=30)
        outcome = chat.compact()
        results["compact"] = [(s.start, s.end, s.level) for s in outcome.summaries]
        results["cover"] = [(s.start, s.end) for s in chat.summary_cover()]
        results["calibrate"] = chat.calibrate(counted=100, reported=120)
        results["correction"] = chat.correction()
        branch = chat.fork(at=3, title="branch")
        branch.send("in the branch", max_tokens=30)
        results["context"] = chat.context().messages
        results["export"] = plain_export(chat.export())
        results["branch"] = plain_export(branch.export())
        results["history"] = chat.history()
        results["calls"] = plain_calls(chat.calls())
        results["usage"] = asdict(chat.usage()) | {"latency_ms": None}
        results["summaries"] = summaries(memory.database, chat.id)
        results["listed"] = [(c.title, c.message_count) for c in memory.conversations(user="ann")]
        results["found"] = memory.find("branch").title
        results["count"] = memory.count(user="ann")
        results["search"] = plain_hits(chat.search("story message 3", limit=5))
        results["search_fork"] = plain_hits(branch.search("branch hello"))
        results["search_user"] = plain_hits(memory.search("branch story", user="ann"))
        return results


def run_async(path: Path, server: ChatServer) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        with server.client() as own_client:
            async with (
                server.async_client() as client,
                AsyncMemory(
                    path,
                    client=client,
                    model=MODEL,
                    strategy="summary",
                    summarizer=RecordingSummarizer(),
                    compaction="after",
                ) as memory,
            ):
                chat = await memory.conversation(user="ann", system="Be brief.", title="parity")
                results: dict[str, Any] = {}
                results["send"] = (await chat.send("hello there", max_tokens=30)).text
                async with chat.stream("tell me a story", max_tokens=30) as stream:
                    results["stream"] = "".join([piece async for piece in stream])
                messages = await chat.prepare("What is 2 + 2?", max_tokens=30)
                results["prepared"] = chat.prepared.report.total if chat.prepared else None
                completion = own_client.chat.completions.create(model=MODEL, messages=messages)
                results["record"] = (await chat.record(completion)).position
                for n in range(TURNS):
                    await chat.send(f"message {n} " + "word " * 25, max_tokens=30)
                outcome = await chat.compact()
                results["compact"] = [(s.start, s.end, s.level) for s in outcome.summaries]
                results["cover"] = [(s.start, s.end) for s in await chat.summary_cover()]
                results["calibrate"] = await chat.calibrate(counted=100, reported=120)
                results["correction"] = await chat.correction()
                branch = await chat.fork(at=3, title="branch")
                await branch.send("in the branch", max_tokens=30)
                results["context"] = (await chat.context()).messages
                results["export"] = plain_export(await chat.export())
                results["branch"] = plain_export(await branch.export())
                results["history"] = await chat.history()
                results["calls"] = plain_calls(await chat.calls())
                results["usage"] = asdict(await chat.usage()) | {"latency_ms": None}
                results["summaries"] = summaries(memory.database, chat.id)
                listed = await memory.conversations(user="ann")
                results["listed"] = [(c.title, c.message_count) for c in listed]
                results["found"] = (await memory.find("branch")).title
                results["count"] = await memory.count(user="ann")
                results["search"] = plain_hits(await chat.search("story message 3", limit=5))
                results["search_fork"] = plain_hits(await branch.search("branch hello"))
                found = await memory.search("branch story", user="ann")
                results["search_user"] = plain_hits(found)
                return results

    return asyncio.run(main())


def test_both_drivers_store_the_same_rows(tmp_path: Path) -> None:
    runs: dict[str, dict[str, Any]] = {}
    drivers: dict[str, Callable[[Path, ChatServer], dict[str, Any] | Awaitable[Any]]] = {
        "sync": run_sync,
        "async": run_async,
    }
    for name, driver in drivers.items():
        with ChatServer(window=1000, model=MODEL) as server:
            runs[name] = driver(tmp_path / f"{name}.db", server)  # type: ignore[assignment]
            assert server.rejections == []
    sync, async_ = runs["sync"], runs["async"]
    assert sync["summaries"], "the table must cover compactions that stored summaries"
    assert [c["kind"] for c in sync["calls"]].count("summary") >= 1
    assert sync["search"], "the table must cover searches that find something"
    assert {hit["title"] for hit in sync["search_fork"]} == {"parity", "branch"}
    for behaviour in sync:
        assert async_[behaviour] == sync[behaviour], behaviour
