"""Search through the public API: ``Conversation.search``, ``Memory.search`` and their
async twins, on a real SQLite file and on PostgreSQL.

What the index itself keeps and how it ranks is tested in test_search.py; here,
what a caller is promised: which messages a conversation or a user may find
(forks, users, deletes), what a hit carries, and that any text is a search and
never an error, while bad arguments are refused with ``ConfigurationError``.
"""

from __future__ import annotations

import asyncio
import functools
import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation_memory import (
    AsyncMemory,
    ConfigurationError,
    ConversationNotFound,
    Memory,
    SearchHit,
)

USER = "ann"


def places(hits: list[SearchHit]) -> set[tuple[str, int]]:
    return {(hit.conversation_id, hit.position) for hit in hits}


def test_a_hit_carries_the_message_as_stored(db_url):
    function = {"name": "lookup_fare", "arguments": '{"to": "Tromsø"}'}
    call = {"id": "call_7", "type": "function", "function": function}
    written = [
        {"role": "user", "content": [{"type": "text", "text": "how much is the ferry?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": "ferry fare: 40 kroner"},
        {"role": "user", "name": "ann_b", "content": "and the ferry back?"},
    ]
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER, title="fares")
        before = datetime.now(UTC) - timedelta(seconds=5)
        chat.extend(written)
        history = chat.history()
        hits = chat.search("FERRY lookup_fare", limit=10)
        assert sorted(hit.position for hit in hits) == [0, 1, 2, 3]
        for hit in hits:
            assert isinstance(hit, SearchHit)
            assert hit.message == history[hit.position]
            assert hit.role == hit.message["role"]
            assert (hit.conversation_id, hit.title) == (chat.id, "fares")
            assert before <= hit.created_at <= datetime.now(UTC)
            assert hit.created_at.tzinfo is not None
            assert "**" in hit.snippet
        calling = next(hit for hit in hits if hit.position == 1)
        assert calling.text == 'lookup_fare({"to": "Tromsø"})'
        assert calling.score == max(hit.score for hit in hits), "the rarer word ranks first"
        with pytest.raises(AttributeError):
            calling.score = 0  # type: ignore[misc]  # frozen


def test_a_fork_finds_its_shared_history_and_its_own_messages_only(db_url):
    with Memory(db_url) as memory:
        parent = memory.conversation(user=USER, title="parent")
        parent.extend([{"role": "user", "content": f"walrus {n}"} for n in range(3)])
        fork = parent.fork(at=1, title="fork")
        fork.append({"role": "user", "content": "walrus in the fork"})
        parent.append({"role": "user", "content": "walrus after the fork"})
        grandchild = fork.fork(at=2)

        assert places(fork.search("walrus")) == {(parent.id, 0), (parent.id, 1), (fork.id, 2)}
        shared = [hit for hit in fork.search("walrus") if hit.conversation_id == parent.id]
        assert {hit.title for hit in shared} == {"parent"}, "found under the parent that stores it"
        assert places(parent.search("walrus")) == {(parent.id, p) for p in range(4)}
        assert places(parent.search("fork")) == {(parent.id, 3)}, "not the fork's own message"
        assert places(grandchild.search("walrus")) == places(fork.search("walrus"))
        assert fork.search("after") == []
        # Across the user's conversations, a shared message is found once.
        assert len(memory.search("walrus", user=USER)) == 5


def test_users_are_isolated_and_user_means_what_it_means_in_listings(db_url):
    with Memory(db_url) as memory:
        memory.conversation(user="ann").append({"role": "user", "content": "ann's puffin"})
        memory.conversation(user="bob").append({"role": "user", "content": "bob's puffin"})
        memory.conversation().append({"role": "user", "content": "the default puffin"})

        def texts(**options):
            return sorted(hit.text for hit in memory.search("puffin", **options))

        assert texts(user="ann") == ["ann's puffin"]
        assert texts(user="bob") == ["bob's puffin"]
        assert texts() == ["the default puffin"], "no user: the default user, as in listings"
        assert texts(all_users=True) == ["ann's puffin", "bob's puffin", "the default puffin"]
        assert texts(user="carol") == []
        with pytest.raises(ConfigurationError, match="not both"):
            memory.search("puffin", user="ann", all_users=True)
        for bad in ["yes", 1, None]:
            with pytest.raises(ConfigurationError, match="all_users"):
                memory.search("puffin", all_users=bad)  # type: ignore[arg-type]
        for bad_user in ["", "x" * 256, 7]:
            with pytest.raises(ConfigurationError, match="user"):
                memory.search("puffin", user=bad_user)  # type: ignore[arg-type]
        # A conversation searches as its owner: bob's conversation cannot see ann's.
        bobs = memory.conversations(user="bob")[0]
        assert places(memory.conversation(bobs.id, user="bob").search("puffin ann")) == {
            (bobs.id, 0)
        }


def test_delete_and_erase_remove_hits(db_url):
    with Memory(db_url) as memory:
        parent = memory.conversation(user=USER)
        parent.extend([{"role": "user", "content": "shared gannet"}] * 2)
        fork = parent.fork(at=0)
        fork.append({"role": "user", "content": "the fork's gannet"})
        other = memory.conversation(user="bob")
        other.append({"role": "user", "content": "bob's gannet"})

        parent.delete()
        # The fork was handed the message it shared, and finds it as its own now.
        assert places(fork.search("gannet")) == {(fork.id, 0), (fork.id, 1)}
        assert places(memory.search("gannet", user=USER)) == {(fork.id, 0), (fork.id, 1)}
        with pytest.raises(ConversationNotFound):
            parent.search("gannet")

        memory.erase_user(USER)
        assert memory.search("gannet", user=USER) == []
        assert places(memory.search("gannet", all_users=True)) == {(other.id, 0)}
        with pytest.raises(ConversationNotFound):
            fork.search("gannet")


def test_a_lazy_conversation_finds_nothing_until_its_first_message(tmp_path):
    with Memory(tmp_path / "lazy.db") as memory:
        memory.conversation(user=USER).append({"role": "user", "content": "an older kittiwake"})
        lazy = memory.conversation(user=USER, lazy=True)
        assert lazy.search("kittiwake") == []
        lazy.append({"role": "user", "content": "a new kittiwake"})
        assert places(lazy.search("kittiwake")) == {(lazy.id, 0)}


BAD_TEXT = [None, 7, b"bytes", ["a", "list"]]
BAD_LIMITS = [0, -1, 1001, True, 2.5, "10", None]


def test_bad_arguments_are_refused_before_anything_is_read(tmp_path):
    with Memory(tmp_path / "args.db") as memory:
        chat = memory.conversation(user=USER)
        chat.append({"role": "user", "content": "anything"})
        for search in (chat.search, functools.partial(memory.search, user=USER)):
            for text in BAD_TEXT:
                with pytest.raises(ConfigurationError, match="text must be a string"):
                    search(text)  # type: ignore[arg-type]
            for limit in BAD_LIMITS:
                with pytest.raises(ConfigurationError, match="limit must be a whole number"):
                    search("anything", limit=limit)  # type: ignore[arg-type]
            # No word in the text: nothing is found, and that is not an error.
            for text in ["", "   \n\t", "*** --- ()", "\x00"]:
                assert search(text) == []
            assert len(search("anything", limit=1000)) == 1
        memory.close()
        with pytest.raises(ConfigurationError, match="text"):
            chat.search(3)  # type: ignore[arg-type]  # checked before the closed store is used


HOSTILE = [
    '"', "'", "(", ")", "*", "-", "+", "^", ":", "NEAR", "NEAR(", "AND", "OR", "NOT",
    "body:", "scope:", "content:", "{body}:", "\\", "%s", ":name", "?", "\x00", "\ud800",
    "é", "東京", "🙂", "'; DROP TABLE messages; --",
]  # fmt: skip
"""Pieces of query syntax of FTS5, tsquery, SQL and the drivers' parameter styles."""

QUERY = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.one_of(st.sampled_from(HOSTILE), st.text(string.ascii_letters, max_size=8)),
        max_size=30,
    ).map(lambda pieces: "".join(pieces) if len(pieces) % 2 else " ".join(pieces)),
)


def test_hostile_text_is_a_search_never_an_error(db_url):
    """Any text, through the public API, on both backends: a list of hits of this
    conversation (or user), never an exception; only a bad limit is refused."""
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([
            {"role": "user", "content": 'quotes " and \' and NEAR(a b) and body: scope: *'},
            {"role": "assistant", "content": "東京 🙂 é (parentheses) - minus + plus"},
        ])  # fmt: skip
        memory.conversation(user="bob").append({"role": "user", "content": "bob's NEAR body"})

        for text in ["z" * 100_000, "word " * 20_000, "NEAR " * 5000, "\x00" * 1000]:
            assert {hit.conversation_id for hit in chat.search(text)} <= {chat.id}
            memory.search(text, user=USER)
        assert places(chat.search('"NEAR(a')) == {(chat.id, 0)}

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(QUERY, st.integers(0, 1001))
        def never_raises(text: str, limit: int) -> None:
            if not 1 <= limit <= 1000:
                with pytest.raises(ConfigurationError, match="limit"):
                    chat.search(text, limit=limit)
                return
            for hit in chat.search(text, limit=limit):
                assert hit.conversation_id == chat.id
            for hit in memory.search(text, user=USER, limit=limit):
                assert hit.conversation_id == chat.id
            assert len(memory.search(text, all_users=True, limit=limit)) <= limit

        never_raises()
        assert len(chat.history()) == 2, "nothing was changed by any of it"


def test_the_async_twins_find_the_same(db_url):
    with Memory(db_url) as memory:
        parent = memory.conversation(user=USER, title="sync")
        parent.extend([{"role": "user", "content": f"a loon, number {n}"} for n in range(3)])
        fork = parent.fork(at=1)
        fork.append({"role": "assistant", "content": "loon in the fork"})
        expected = (parent.search("loon"), fork.search("loon number"), memory.search("loon"))
        expected_user = memory.search("loon", user=USER)

    async def main():
        async with AsyncMemory(db_url) as amemory:
            aparent = await amemory.conversation(parent.id, user=USER)
            afork = await amemory.conversation(fork.id, user=USER)
            found = (
                await aparent.search("loon"),
                await afork.search("loon number"),
                await amemory.search("loon"),
            )
            assert await amemory.search("loon", user=USER) == expected_user
            with pytest.raises(ConfigurationError, match="limit"):
                await afork.search("loon", limit=0)
            with pytest.raises(ConfigurationError, match="text"):
                await amemory.search(None)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError, match="not both"):
                await amemory.search("loon", user=USER, all_users=True)
            await afork.delete()
            with pytest.raises(ConversationNotFound):
                await afork.search("loon")
            lazy = await amemory.conversation(user=USER, lazy=True)
            assert await lazy.search("loon") == []
            return found

    assert asyncio.run(main()) == expected
