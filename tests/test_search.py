"""Full-text search in the store: kept by the database with every write, read by
``store.search``, on a real SQLite file and on PostgreSQL.

Messages are written through the library (``Conversation.append``, ``extend``,
``fork``, ``delete``, ``Memory.erase_user``, ``import_conversation``); the
search functions get the connection of a read transaction, as their callers
will.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation_memory import ConfigurationError, Memory
from conversation_memory.store import search

USER = "ann"


def lineage_of(memory: Memory, conversation):
    return conversation._log.lineage()


def find(memory: Memory, conversation, query: str, **options) -> list[search.SearchHit]:
    segments = lineage_of(memory, conversation)
    with memory.database.read() as conn:
        return search.search_lineage(conn, segments, query, **options)


def find_for(memory: Memory, query: str, *, user: str | None = USER, **options):
    with memory.database.read() as conn:
        return search.search_user(conn, query, user=user, **options)


def places(hits: list[search.SearchHit]) -> list[tuple[str, int]]:
    return [(hit.conversation_id, hit.position) for hit in hits]


def index_agrees(memory: Memory) -> None:
    # SQLite's FTS5 integrity-check is an INSERT command: it needs a write transaction.
    with memory.database.write() as conn:
        assert search.check_index(conn) == []


def found_by_words(conversation, words: dict[str, set[int]]) -> None:
    """Each word is found in exactly the messages at its positions (``words``: word ->
    positions of the messages that hold it; a word only one message holds finds that
    message). Searched eight words at a time (measured the quickest), through the
    public API.

    For the concurrency and crash tests: every stored message is indexed, once, where
    it is stored."""
    items = sorted(words.items())
    for start in range(0, len(items), 8):
        batch = dict(items[start : start + 8])
        expected = set().union(*batch.values())
        hits = conversation.search(" ".join(batch), limit=len(expected) + 1)
        assert sorted(hit.position for hit in hits) == sorted(expected)
        for hit in hits:
            held = {w for w in re.findall(r"\w+", hit.text.casefold()) if w in batch}
            assert any(hit.position in batch[w] for w in held), hit


def count_matching(memory: Memory, word: str) -> int:
    """Index entries holding ``word``, read from the index itself, not through a search."""
    with memory.database.read() as conn:
        if memory.database.dialect == "postgresql":
            query = "SELECT count(*) FROM messages WHERE search_vector @@ to_tsquery('simple', :w)"
            return conn.execute(sa.text(query), {"w": word}).scalar_one()
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.search_terms "
            "USING fts5vocab(main, messages_fts, 'row')"
        )
        found = conn.execute(
            sa.text("SELECT doc FROM temp.search_terms WHERE term = :w"), {"w": word}
        ).scalar()
        return found or 0


def test_every_appended_message_is_searchable_right_after_append(db_url):
    call = {"id": "call_1", "type": "function", "function": {
        "name": "get_forecast", "arguments": json.dumps({"city": "Reykjavik"})}}  # fmt: skip
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        before = datetime.now(UTC) - timedelta(seconds=5)
        written = [
            {"role": "user", "content": "my locker code is zebra4821"},
            {"role": "assistant", "content": [{"type": "text", "text": "Noted: quokka"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at this"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/wombat.png"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sleet and narwhals"},
        ]
        expected = ["zebra4821", "quokka", "look", "reykjavik", "narwhals"]
        for position, (message, word) in enumerate(zip(written, expected, strict=True)):
            chat.append(message)
            hits = find(memory, chat, word.upper())
            assert places(hits) == [(chat.id, position)], word
            hit = hits[0]
            assert hit.role == message["role"]
            assert word in hit.text.lower()
            assert f"{search.MARK_START}" in hit.snippet
            assert word in hit.snippet.lower()
            assert before <= hit.created_at <= datetime.now(UTC)
            assert hit.score > 0
            assert places(find_for(memory, word)) == [(chat.id, position)]
        # Only text is indexed: not an image's URL, not the JSON around parts.
        assert find(memory, chat, "wombat") == []
        assert find(memory, chat, "image_url") == []
        assert find_for(memory, "get_forecast")[0].text == 'get_forecast({"city": "Reykjavik"})'
        # extend() and an import write through the same index.
        chat.extend([{"role": "user", "content": "one ocelot"}, {"role": "user", "content": "x"}])
        assert places(find(memory, chat, "ocelot")) == [(chat.id, 5)]
        copy = memory.import_conversation(chat.export(), new_id=True)
        assert sorted(places(find_for(memory, "ocelot"))) == sorted([(chat.id, 5), (copy.id, 5)])
        index_agrees(memory)


def test_a_fork_finds_its_shared_history_not_its_parents_later_messages(db_url):
    with Memory(db_url) as memory:
        parent = memory.conversation(user=USER)
        parent.extend([{"role": "user", "content": f"alpha number {n}"} for n in range(4)])
        fork = parent.fork(at=1)
        fork.append({"role": "user", "content": "alpha in the fork"})
        parent.append({"role": "user", "content": "alpha after the fork"})
        grandchild = fork.fork(at=1)

        assert set(places(find(memory, fork, "alpha"))) == {
            (parent.id, 0), (parent.id, 1), (fork.id, 2)
        }  # fmt: skip
        assert set(places(find(memory, grandchild, "alpha"))) == {(parent.id, 0), (parent.id, 1)}
        assert len(find(memory, parent, "alpha")) == 5
        # Across the user's conversations each stored message comes once.
        assert len(find_for(memory, "alpha")) == 6


def test_before_keeps_only_older_positions(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([{"role": "user", "content": f"heron {n}"} for n in range(6)])
        fork = chat.fork(at=3)
        fork.append({"role": "user", "content": "heron again"})
        assert sorted(p for _, p in places(find(memory, chat, "heron", before=4))) == [0, 1, 2, 3]
        assert sorted(p for _, p in places(find(memory, fork, "heron", before=2))) == [0, 1]
        assert find(memory, chat, "heron", before=0) == []
        assert len(find(memory, chat, "heron", limit=2)) == 2


def test_delete_and_erase_leave_nothing_in_the_index(db_url):
    with Memory(db_url) as memory:
        parent = memory.conversation(user=USER)
        parent.extend([
            {"role": "user", "content": "shared wallaby"},
            {"role": "assistant", "content": [{"type": "text", "text": "later wallaby"}]},
        ])  # fmt: skip
        fork = parent.fork(at=0)
        fork.append({"role": "user", "content": "fork wallaby"})
        other = memory.conversation(user="bob")
        other.append({"role": "user", "content": "bob keeps his wallaby"})
        assert count_matching(memory, "wallaby") == 4

        parent.delete()  # the fork is handed the message it shares
        assert count_matching(memory, "wallaby") == 3
        assert sorted(places(find(memory, fork, "wallaby"))) == [(fork.id, 0), (fork.id, 1)]
        assert count_matching(memory, "later") == 0
        index_agrees(memory)

        memory.erase_user(USER)
        assert count_matching(memory, "wallaby") == 1
        assert count_matching(memory, "shared") == 0
        assert count_matching(memory, "fork") == 0
        assert find_for(memory, "wallaby") == []
        assert places(find_for(memory, "wallaby", user=None)) == [(other.id, 0)]
        index_agrees(memory)


def test_deleting_conversation_rows_directly_cascades_into_the_index(db_url):
    """The foreign keys' ON DELETE CASCADE fires the index's triggers too."""
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([{"role": "user", "content": "cassowary"}] * 3)
        with memory.database.write() as conn:
            conn.execute(sa.text("DELETE FROM conversations WHERE id = :id"), {"id": chat.id})
        assert count_matching(memory, "cassowary") == 0
        index_agrees(memory)


def test_an_updated_message_is_reindexed(db_url):
    """The library never updates a message; if anything does, the index follows it."""
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.append({"role": "user", "content": "pangolin"})
        with memory.database.write() as conn:
            conn.execute(sa.text("UPDATE messages SET content = 'armadillo'"))
        assert find(memory, chat, "pangolin") == []
        assert places(find(memory, chat, "armadillo")) == [(chat.id, 0)]
        index_agrees(memory)


def test_more_and_rarer_words_rank_first(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        texts = [
            "apple",
            "apple banana",
            "banana cherry apple",
            "nothing to see",
            "apple apple apple",
            "durian",
        ] + [f"filler apple text {n}" for n in range(10)]
        chat.extend([{"role": "user", "content": t} for t in texts])
        hits = find(memory, chat, "apple banana cherry durian", limit=4)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
        # Rarity counts: durian and cherry occur once, and outrank the many apples;
        # so do more of the words.
        assert [hit.position for hit in hits[:3]] == [2, 5, 1]
        assert 3 not in [hit.position for hit in find(memory, chat, "apple", limit=50)]


def test_words_too_common_to_rank_are_left_out_or_newest_first(db_url, monkeypatch):
    monkeypatch.setattr(search, "CANDIDATES", 5)
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([{"role": "user", "content": f"the common word {n}"} for n in range(8)])
        chat.append({"role": "user", "content": "the rare ibex"})
        other = memory.conversation(user=USER)
        other.append({"role": "user", "content": "the ibex elsewhere"})
        # "the" is in 10 messages, more than CANDIDATES: only "ibex" is ranked.
        hits = find(memory, chat, "the ibex")
        assert places(hits) == [(chat.id, 8)]
        assert hits[0].score > 0
        # Nothing but common words: newest first, unranked, still only this conversation.
        hits = find(memory, chat, "the common", limit=3)
        assert [hit.position for hit in hits] == [8, 7, 6]
        assert {hit.score for hit in hits} == {0.0}
        assert [h.position for h in find(memory, chat, "the", before=3)] == [2, 1, 0]
        assert len(find_for(memory, "the", limit=20)) == 10


def test_unicode_words(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        texts = [
            "Ein Café in München",
            "Привет, как дела?",
            "ΩMEGA point",
            "東京 タワー",
            "emoji 🙂 ahead",
            "naïve résumé",
        ]
        chat.extend([{"role": "user", "content": t} for t in texts])
        for query, position in [
            ("café", 0),
            ("MÜNCHEN", 0),
            ("привет", 1),
            ("ωmega", 2),
            ("東京", 3),
            ("ahead 🙂", 4),
            ("NAÏVE", 5),
        ]:
            assert [h.position for h in find(memory, chat, query)] == [position], query
        assert find(memory, chat, "🙂") == []
        if memory.database.dialect == "sqlite":  # unicode61 folds diacritics; simple does not
            assert sorted(h.position for h in find(memory, chat, "cafe resume")) == [0, 5]


def test_empty_queries_and_bad_limits(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.append({"role": "user", "content": "anything at all"})
        for query in ["", "   ", "*** --- !!! ()", "\x00", "x" * (search.MAX_WORD_LENGTH + 1)]:
            assert find(memory, chat, query) == []
            assert find_for(memory, query) == []
        for limit in [0, -1, search.MAX_LIMIT + 1, True, "10", 2.5, None]:
            with pytest.raises(ConfigurationError, match="limit"):
                find(memory, chat, "anything", limit=limit)
            with pytest.raises(ConfigurationError, match="limit"):
                find_for(memory, "anything", limit=limit)


def test_query_words_are_literal_and_capped():
    assert search.query_words('say "hi" OR NOT-me (x* AND NEAR(y') == [
        "say", '"hi"', "OR", "NOT-me", "(x*", "AND", "NEAR(y"
    ]  # fmt: skip
    assert search.query_words("Hello hello HELLO") == ["Hello"]
    many = " ".join(f"w{n}" for n in range(100))
    assert search.query_words(many) == [f"w{n}" for n in range(search.MAX_WORDS)]
    assert search.query_words("a\x00b \ud800c") == ["a", "b", "c"]


HOSTILE = [
    '"',
    '""',
    "'",
    "unbalanced (",
    ") closing",
    "NEAR(a b, 2)",
    "a AND",
    "OR OR OR",
    "NOT",
    "-minus",
    "*",
    "prefix*",
    "^start",
    "body:word",
    "scope:616263",
    "{body scope}: x",
    "col : (a OR b)",
    "a + b",
    "\\",
    "%s %(x)s :name ?",
    "'; DROP TABLE messages; --",
    "x\x00y",
    "\ud83d",
    "word " * 10_000,
    "é" * 5000,
    "z" * 1_000_000,
    " ".join(string.punctuation),
]


def test_hostile_queries_never_raise(db_url):
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([
            {"role": "user", "content": "a word with quotes \" and 'apostrophes' and NEAR"},
            {"role": "assistant", "content": "body scope minus start prefix"},
        ])  # fmt: skip
        segments = lineage_of(memory, chat)
        for query in HOSTILE:
            with memory.database.read() as conn:
                search.search_lineage(conn, segments, query)
                search.search_user(conn, query, user=USER)
        assert places(find(memory, chat, '"NEAR"')) == [(chat.id, 0)]

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.text(max_size=300), st.integers(1, 20))
        def never_raises(query, limit):
            with memory.database.read() as conn:
                for hit in search.search_lineage(conn, segments, query, limit=limit):
                    assert hit.conversation_id == chat.id
                search.search_user(conn, query, user=USER, limit=limit)

        never_raises()
        assert memory.conversation(chat.id, user=USER).history()[0]["content"].startswith("a word")


MESSAGE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(0, 20), MESSAGE_TEXT),
            st.tuples(st.just("fork"), st.integers(0, 20), st.integers(-1, 30)),
            st.tuples(st.just("delete"), st.integers(0, 20)),
        ),
        max_size=25,
    )
)
def test_any_mix_of_appends_forks_and_deletes_keeps_the_index_exact(ops):
    """After any history, the index holds exactly the stored messages, and each
    conversation finds each of its messages (own or shared) by a word unique to it."""
    with Memory(":memory:") as memory:
        root = memory.conversation(user=USER)
        live = {root.id: (root, [])}
        for n, op in enumerate(ops):
            ids = sorted(live)
            if not ids:
                break
            conversation, model = live[ids[op[1] % len(ids)]]
            if op[0] == "append":
                marker = f"mark{n}x"
                conversation.append({"role": "user", "content": f"{op[2]} {marker}"})
                model.append(marker)
            elif op[0] == "fork":
                at = op[2] % (len(model) + 1) - 1
                child = conversation.fork(at=at)
                live[child.id] = (child, model[: at + 1])
            else:
                conversation.delete()
                del live[conversation.id]
        index_agrees(memory)
        for conversation, model in live.values():
            for position, marker in enumerate(model):
                hits = find(memory, conversation, marker)
                assert [hit.position for hit in hits] == [position]


def test_check_index_reports_an_index_out_of_step(db_url):
    """check_index is what the consistency tests lean on: it must see a stale index."""
    with Memory(db_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([{"role": "user", "content": "first"}, {"role": "user", "content": "second"}])
        index_agrees(memory)
        with memory.database.write() as conn:
            if memory.database.dialect == "sqlite":
                # A message removed behind the index's back.
                conn.exec_driver_sql("DROP TRIGGER messages_fts_delete")
                conn.exec_driver_sql("DELETE FROM messages WHERE position = 0")
            else:
                # What the generated column was computed with, changed afterwards.
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION convmem_message_text(content text, parts text, "
                    "tool_calls text) "
                    "RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'other words' $$"
                )
        with memory.database.write() as conn:
            assert search.check_index(conn) != []


def test_postgres_uses_analyze_statistics_for_common_words(pg_url, monkeypatch):
    """Once ANALYZE has sampled the column, a word among its commonest is not
    counted row by row; the answers stay the same."""
    monkeypatch.setattr(search, "CANDIDATES", 5)
    with Memory(pg_url) as memory:
        chat = memory.conversation(user=USER)
        chat.extend([{"role": "user", "content": f"the usual chatter {n}"} for n in range(60)])
        chat.append({"role": "user", "content": "the rare lynx"})
        queries = ["the lynx", "the usual", "lynx", "the"]
        before = {q: places(find(memory, chat, q)) for q in queries}
        with memory.database.write() as conn:
            conn.exec_driver_sql("ANALYZE messages")
        with memory.database.read() as conn:
            counts = search._Postgres().counts(conn, ["the", "lynx"])
        assert counts[1] == 1  # rare: counted
        assert 50 <= counts[0] <= 70  # common: ANALYZE's sampled frequency, not a count
        assert {q: places(find(memory, chat, q)) for q in queries} == before
        assert before["the lynx"] == [(chat.id, 60)]
