"""``memory.conversation(lazy=True)``: stored with its first turn, never as an empty leftover.

The id is drawn at once, but the row is written in the transaction of the
first stored message: a first call that fails, a message refused for its
size, or a conversation nobody wrote to leaves nothing in the database, and
the next "resume the most recent" (``convmem chat``) finds the last real one.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from conversation_memory import (
    AsyncMemory,
    AuthenticationFailed,
    BudgetExceeded,
    ConfigurationError,
    ContextLengthExceeded,
    ConversationNotFound,
    Memory,
    register_model,
)
from conversation_memory.llm import RetryPolicy
from conversation_memory.testing import ChatServer, Fault

MODEL = "test-model"


@pytest.fixture(scope="module", autouse=True)
def _test_model():
    register_model(MODEL, window=1000, max_output=200)


@pytest.fixture
def server():
    with ChatServer(window=1000, model=MODEL) as server:
        yield server


def count(memory: Memory, table: str) -> int:
    with memory.database.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_failed_and_refused_first_turns_leave_no_conversation(db_url, server):
    with (
        server.client() as client,
        Memory(db_url, client=client, model=MODEL, retry=RetryPolicy(attempts=1)) as memory,
    ):
        chat = memory.conversation(
            user="ann", system="Be brief.", title="trip", budget=300, lazy=True
        )
        # Usable before anything is stored: it reads as an empty conversation.
        assert (chat.history(), len(chat), chat.calls()) == ([], 0, [])
        assert chat.context().messages == [{"role": "system", "content": "Be brief."}]
        assert memory.conversations(user="ann") == []
        with pytest.raises(ConversationNotFound):
            memory.conversation(chat.id, user="ann")

        server.fail(Fault.status(401))
        with pytest.raises(AuthenticationFailed):
            chat.send("hello")
        with pytest.raises(BudgetExceeded):
            chat.send("word " * 400)
        server.fail(Fault.context_length(), times=2)  # calibrates, re-fits, fails again
        with pytest.raises(ContextLengthExceeded):
            chat.send("hello", max_tokens=20)
        assert chat.correction().factor == 1, "a failed call's claim is never kept"
        learnt = chat.calibrate(counted=100, reported=130)  # no row yet: kept on the object
        assert chat.correction() == learnt
        assert learnt.factor > 1
        assert [count(memory, t) for t in ("conversations", "usage", "calibrations")] == [0, 0, 0]

        reply = chat.send("hello")
        [info] = memory.conversations(user="ann")
        assert (info.id, info.title, info.message_count) == (chat.id, "trip", 2)
        assert info.created_at == chat.entries()[0].created_at
        again = memory.conversation(chat.id, user="ann")
        assert again.system == "Be brief."
        assert again.budget().limit == 300
        assert again.history()[1]["content"] == reply.text
        assert again.correction() == chat.correction(), "stored with the first turn"


def test_a_deleted_new_conversation_stays_deleted_and_eager_is_the_default(tmp_path):
    with Memory(tmp_path / "c.db") as memory:
        shared = memory.conversation(title="handed to another process before a word is said")
        assert memory.conversation(shared.id).title == shared.title
        with pytest.raises(ConfigurationError, match="lazy"):
            memory.conversation(shared.id, lazy=True)
        chat = memory.conversation(lazy=True)
        chat.delete()
        with pytest.raises(ConversationNotFound):
            chat.append({"role": "user", "content": "too late"})
        assert [c.id for c in memory.conversations()] == [shared.id]


def test_async_first_turn_that_fails_leaves_nothing(tmp_path, server):
    async def main():
        async with (
            server.async_client() as client,
            AsyncMemory(tmp_path / "c.db", client=client, model=MODEL) as memory,
        ):
            chat = await memory.conversation(strategy="summary", lazy=True)
            server.fail(Fault.status(401))
            with pytest.raises(AuthenticationFailed):
                await chat.send("hello")
            assert await memory.conversations() == []
            await chat.send("hello")
            assert [c.id for c in await memory.conversations()] == [chat.id]

    asyncio.run(main())
