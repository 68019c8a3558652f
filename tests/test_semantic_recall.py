"""Recall by meaning: with a memory's embeddings, a recalling strategy embeds the new
question before the snapshot read and fuses the nearest messages with the words' hits.

Over real HTTP (the ``openai`` SDK and ``testing.ChatServer``) on a real SQLite file and
on PostgreSQL. The server's default embeddings model is a hashed bag of words, which by
construction cannot find what shares no word with the question; so these tests plug in
:func:`synonym_embedder`, a test double that maps declared synonym groups to one
dimension each, to show that the vector path recalls a fact the words miss, and that an
embeddings endpoint that fails leaves the turn to recall by words.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

from conversation_memory import (
    AsyncMemory,
    ConfigurationError,
    Embeddings,
    Memory,
    ServerError,
    lab,
)
from conversation_memory.recall import vector_text
from conversation_memory.testing import ChatServer, Fault

MODEL = "gpt-4o-mini"
EMBED = "synonym-test-embedding"

SYNONYMS = (
    ("automobile", "car", "sedan", "vehicle"),
    ("garage", "carport", "parked", "leave"),
    ("physician", "doctor", "dentist"),
)
"""The test double's only knowledge: each group's words mean the same."""
DIMENSIONS = 8


def synonym_embedder(texts: Sequence[str], dimensions: int | None) -> list[list[float]]:
    """TEST DOUBLE, not a model: each word of a synonym group adds 1 to its group's
    dimension; any other word adds a little (0.1) to one of two shared dimensions, so
    that unrelated texts are barely similar and no vector is empty."""
    group = {word: n for n, words in enumerate(SYNONYMS) for word in words}
    vectors = []
    for text in texts:
        vector = [0.0] * (dimensions or DIMENSIONS)
        for word in text.lower().replace(".", " ").replace("?", " ").split():
            if word in group:
                vector[group[word]] += 1.0
            else:
                vector[len(SYNONYMS) + zlib.crc32(word.encode()) % 2] += 0.1
        vectors.append(vector)
    return vectors


FACT = "My sedan stays in the carport behind the bakery."
QUESTION = "Where did I leave my automobile last week?"
WORDY_FACT = "The wombat enclosure opens at nine on Sundays."
WORDY_QUESTION = "When does the wombat enclosure open?"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def reply(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def history(turns: int, facts: dict[int, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in range(turns):
        said = facts.get(n, f"Filler note {n} about the weather in spring and autumn.")
        out += [user(said), reply("Noted.")]
    return out


def served(db: str, **embedding_options: Any) -> tuple[ChatServer, Any, Memory]:
    server = ChatServer(model=MODEL, window=32_000, embedder=synonym_embedder)
    server.__enter__()
    client = server.client()
    settings = Embeddings(EMBED, background=False, **embedding_options)
    memory = Memory(db, client=client, model=MODEL, embeddings=settings)
    return server, client, memory


def recalled_text(server: ChatServer, question: str) -> str:
    """The recall message of the last request asking ``question`` ("" if it had none;
    a summarizer's request after it is passed over)."""
    asked = [r for r in server.chat_requests if r.body["messages"][-1] == user(question)]
    for message in asked[-1].body["messages"]:
        if message["role"] == "system" and message["content"].startswith("Earlier messages"):
            return str(message["content"])
    return ""


def test_the_test_double_cannot_be_found_by_words_alone() -> None:
    assert not {w.lower().strip("?.") for w in QUESTION.split()} & {
        w.lower().strip("?.") for w in FACT.split()
    } - {"my"}
    assert vector_text([user(QUESTION)]) == "automobile leave last week"
    assert vector_text([reply("no question")]) == ""


def test_a_fact_is_recalled_by_meaning_where_words_find_nothing(db_url: str) -> None:
    server, client, memory = served(db_url)
    with server, client, memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(80, {4: FACT}))
        assert chat.embed_pending() == 160
        before = len(server.embedding_requests)
        chat.send(QUESTION, max_tokens=20)
        assert FACT in recalled_text(server, QUESTION)
        asked = server.embedding_requests[before:]
        assert [r.body["input"] for r in asked] == [["automobile leave last week"]]
        assert memory._embedder.last_error is None
        # The same conversation recalling by words alone finds nothing for it.
        with Memory(db_url, model=MODEL) as lexical:
            again = lexical.conversation(chat.id, strategy="recall", budget=600)
            again.append(user(QUESTION))
            assert again.context().recalled == ()


def test_a_failing_embeddings_endpoint_leaves_recall_to_words(db_url: str) -> None:
    server, client, memory = served(db_url)
    with server, client, memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(80, {4: FACT, 9: WORDY_FACT}))
        chat.embed_pending()
        server.fail(Fault.status(500), times=2, route="embeddings")
        chat.send(WORDY_QUESTION, max_tokens=20)  # the turn succeeds
        assert WORDY_FACT in recalled_text(server, WORDY_QUESTION)
        assert isinstance(memory._embedder.last_error, ServerError)
        chat.send(QUESTION, max_tokens=20)
        assert FACT not in recalled_text(server, QUESTION)  # words cannot find it
        assert len(chat) == 164
        chat.send(QUESTION, max_tokens=20)  # the endpoint is back
        assert FACT in recalled_text(server, QUESTION)


def test_messages_not_embedded_yet_are_found_by_their_words(db_url: str) -> None:
    server, client, memory = served(db_url)
    with server, client, memory:
        chat = memory.conversation(strategy="summary+recall", budget=600)
        chat.extend(history(60, {3: FACT, 7: WORDY_FACT}))
        chat.send(WORDY_QUESTION, max_tokens=20)  # nothing has a vector
        assert WORDY_FACT in recalled_text(server, WORDY_QUESTION)
        assert FACT not in recalled_text(server, WORDY_QUESTION)


def test_a_high_similarity_floor_keeps_the_vectors_out(tmp_path) -> None:
    server, client, memory = served(str(tmp_path / "c.db"), min_similarity=0.99)
    with server, client, memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(60, {4: FACT}))
        chat.embed_pending()
        chat.send(QUESTION, max_tokens=20)
        assert recalled_text(server, QUESTION) == ""


def test_without_a_recalling_strategy_nothing_is_embedded_for_the_question(tmp_path) -> None:
    server, client, memory = served(str(tmp_path / "c.db"))
    with server, client, memory:
        chat = memory.conversation(strategy="truncate", budget=600)
        chat.send(QUESTION, max_tokens=20)
        assert server.embedding_requests == []


@pytest.mark.parametrize("value", [1, 1.5, -2, "0.3", True, None])
def test_min_similarity_is_checked(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="min_similarity"):
        Embeddings(EMBED, min_similarity=value)


def test_async_conversations_recall_by_meaning_and_fall_back_to_words(tmp_path) -> None:
    async def main() -> tuple[str, str]:
        with ChatServer(model=MODEL, window=32_000, embedder=synonym_embedder) as server:
            async with (
                server.async_client() as client,
                AsyncMemory(
                    tmp_path / "c.db",
                    client=client,
                    model=MODEL,
                    embeddings=Embeddings(EMBED, background=False),
                ) as memory,
            ):
                chat = await memory.conversation(strategy="recall", budget=600)
                await chat.extend(history(60, {4: FACT}))
                await chat.embed_pending()
                await chat.send(QUESTION, max_tokens=20)
                found = recalled_text(server, QUESTION)
                server.fail(Fault.status(503), route="embeddings")
                await chat.send(QUESTION, max_tokens=20)
                return found, recalled_text(server, QUESTION)

    by_meaning, by_words = asyncio.run(main())
    assert FACT in by_meaning
    assert FACT not in by_words


def test_a_refit_after_a_context_length_error_reuses_the_questions_vector(tmp_path) -> None:
    server, client, memory = served(str(tmp_path / "c.db"))
    with server, client, memory:
        chat = memory.conversation(strategy="recall", budget=600)
        chat.extend(history(60, {4: FACT}))
        chat.embed_pending()
        before = len(server.embedding_requests)
        server.fail(Fault.context_length())
        assert chat.send(QUESTION, max_tokens=20).complete
        assert [r.status for r in server.chat_requests] == [400, 200]
        assert len(server.embedding_requests) == before + 1
        assert FACT in recalled_text(server, QUESTION)  # in the re-fitted request too


def test_the_lab_replays_with_embeddings_and_retrieves_by_meaning() -> None:
    messages = [user(FACT), reply("Noted.")]
    for n in range(30):
        messages += [
            user(f"We talked about the weather for a while, note {n}."),
            reply("It stayed pleasant all day."),
        ]
    probe = {"question": QUESTION, "expect": ["bakery"], "evidence": [0]}
    record = {"name": "by meaning", "messages": messages, "probes": [probe]}
    transcript = lab.parse_transcripts(json.dumps(record) + "\n")[0]
    options: dict[str, Any] = {"strategies": ["recall"], "budgets": [300], "model": MODEL}
    by_words = lab.run(transcript, baseline=False, **options)
    assert [p.retained for p in by_words.run("recall", 300).probes] == [(None,)]
    by_meaning = lab.run(transcript, embeddings=EMBED, embedder=synonym_embedder, **options)
    assert [p.retained for p in by_meaning.run("recall", 300).probes] == [("retrieved",)]
    assert by_meaning.meta["embeddings"] == EMBED
    assert by_words.meta["embeddings"] is None
    with pytest.raises(ConfigurationError, match="embedder"):
        lab.run(transcript, embedder=synonym_embedder, **options)
