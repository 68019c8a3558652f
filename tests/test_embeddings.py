"""Optional semantic recall: the test server's embeddings route, the embedder, the
stored vectors and the fused search, on a real SQLite file and on PostgreSQL, over
real HTTP with the real ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation_memory import (
    AsyncMemory,
    ConfigurationError,
    Embeddings,
    MalformedResponse,
    Memory,
    ServerError,
)
from conversation_memory.fusion import fuse
from conversation_memory.store import vectors
from conversation_memory.testing import ChatServer, Fault
from conversation_memory.testing.embeddings import hashed_embedding

MODEL = "gpt-4o-mini"
EMBED = "test-embedding"


def stored_vectors(memory, conversation_id: str | None = None) -> list[tuple[str, int, int]]:
    """(conversation, position, dimensions) of every stored vector, read directly."""
    query = "SELECT conversation_id, position, dimensions FROM message_vectors"
    params = {}
    if conversation_id is not None:
        query += " WHERE conversation_id = :c"
        params["c"] = conversation_id
    with memory.database.read() as conn:
        return sorted(tuple(row) for row in conn.execute(sa.text(query + " ORDER BY 1, 2"), params))


def fused(memory, conversation, text: str, **options) -> list[vectors.Candidate]:
    query = memory._embedder.embed([text])[0]
    segments = conversation._log.lineage()
    with memory.database.read() as conn:
        return vectors.fused_search(
            conn, memory._store.vectors, segments, text, model=EMBED, query=query, **options
        )


@contextmanager
def served(db, embeddings=EMBED, **server_options):
    """A test server and a memory using it for chat and embeddings."""
    with (
        ChatServer(**server_options) as server,
        server.client() as client,
        Memory(db, client=client, model=MODEL, embeddings=embeddings) as memory,
    ):
        yield server, memory


def wait_for(check, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the background embedding did not finish"
        time.sleep(0.02)


# -- fusion (pure) --------------------------------------------------------------------


def test_fuse_adds_reciprocal_ranks():
    fused_list = fuse(["a", "b", "c"], ["c", "d"], k=60)
    assert [item for item, _ in fused_list] == ["c", "a", "b", "d"]
    scores = dict(fused_list)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["a"] == pytest.approx(1 / 61)
    assert scores["d"] == pytest.approx(1 / 62)


def test_fuse_ties_keep_first_met_order_and_repeats_count_once():
    assert [i for i, _ in fuse(["x", "y"], ["y", "x"])] == ["x", "y"]
    assert dict(fuse(["a", "a", "b"]))["a"] == pytest.approx(1 / 61)
    assert fuse([], []) == []
    assert [i for i, _ in fuse(["a", "b"], k=0)] == ["a", "b"]


@pytest.mark.parametrize("k", [-1, 1.5, True, "60"])
def test_fuse_refuses_a_bad_k(k):
    with pytest.raises(ConfigurationError, match="k must be"):
        fuse(["a"], k=k)


# -- the test server's embeddings route ----------------------------------------------


def test_server_embeds_as_openai_does_floats_and_base64():
    texts = ["the kestrel hovers", "The Kestrel, hovering!"]
    with ChatServer() as server, server.client() as client:
        plain = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
        default = client.embeddings.create(model=EMBED, input=texts)  # the SDK asks for base64
        raw = client.embeddings.create(model=EMBED, input="solo", encoding_format="base64")
        short = client.embeddings.create(model=EMBED, input=texts, dimensions=8)
        sent = server.embedding_requests
    assert sent[1].body["encoding_format"] == "base64"
    assert [d.index for d in plain.data] == [0, 1]
    assert plain.data[0].embedding == pytest.approx(hashed_embedding(texts[0]), abs=1e-6)
    assert default.data[1].embedding == pytest.approx(plain.data[1].embedding, abs=1e-6)
    assert plain.usage.prompt_tokens == plain.usage.total_tokens > 0
    assert plain.model == EMBED
    decoded = struct.unpack("<64f", base64.b64decode(raw.data[0].embedding))
    assert decoded == pytest.approx(hashed_embedding("solo"), abs=1e-6)
    assert len(short.data[0].embedding) == 8
    first, second = (d.embedding for d in plain.data)
    assert sum(a * b for a, b in zip(first, second, strict=True)) > 0.3  # shared words
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5)


def test_server_refuses_bad_embedding_requests_and_applies_faults():
    import openai

    with ChatServer(api_key="k1") as server, server.client() as client:
        with pytest.raises(openai.BadRequestError, match="must not be empty"):
            client.embeddings.create(model=EMBED, input=["fine", ""])
        with pytest.raises(openai.BadRequestError, match="token arrays"):
            client.embeddings.create(model=EMBED, input=[[1, 2, 3]])
        server.fail(Fault.status(503), times=1, route="embeddings")
        server.fail(Fault.abrupt_close(before_headers=True), route="embeddings")
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model=EMBED, input="x")
        with pytest.raises(openai.APIConnectionError):
            client.embeddings.create(model=EMBED, input="x")
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert client.embeddings.create(model=EMBED, input="x").data
        with pytest.raises(ValueError, match="not embeddings"):
            server.fail(Fault.context_length(), route="embeddings")
        with pytest.raises(ValueError, match="route must be"):
            server.fail(Fault.status(500), route="images")
    with (
        ChatServer(api_key="k1") as server,
        server.client(api_key="wrong") as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.embeddings.create(model=EMBED, input="x")


def test_server_takes_a_plugged_in_embedder():
    def embedder(texts, dimensions):
        return [[float(len(text)), 1.0] for text in texts]

    with ChatServer(embedder=embedder) as server, server.client() as client:
        answer = client.embeddings.create(model=EMBED, input=["abc", "de"], encoding_format="float")
    assert [d.embedding for d in answer.data] == [[3.0, 1.0], [2.0, 1.0]]


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "match"),
    [(123, "embeddings must be"), ("", "model name")],
)
def test_bad_embeddings_settings_are_refused(tmp_path, setting, match):
    with pytest.raises(ConfigurationError, match=match):
        Memory(tmp_path / "a.db", embeddings=setting)
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"batch": 0}, "batch"),
        ({"dimensions": 0}, "dimensions"),
        ({"timeout": 0}, "timeout"),
        ({"background": "yes"}, "background"),
    ],
)
def test_embeddings_fields_are_checked(options, match):
    with pytest.raises(ConfigurationError, match=match):
        Embeddings(EMBED, **options)


def test_a_memory_without_embeddings_refuses_embed_pending_and_a_wrong_client(tmp_path):
    with served(tmp_path / "a.db", embeddings=None) as (server, memory):
        chat = memory.conversation()
        with pytest.raises(ConfigurationError, match="no embeddings setting"):
            chat.embed_pending()
        wrong = Embeddings(EMBED, client=server.async_client())
        with pytest.raises(ConfigurationError, match=r"must be an openai\.OpenAI"):
            Memory(tmp_path / "b.db", client=memory.client, embeddings=wrong)
    assert not (tmp_path / "b.db").exists()


# -- embedding what is stored ------------------------------------------------------


def test_turns_are_embedded_in_the_background_and_found_by_meaning(db_url):
    with served(db_url) as (server, memory):
        chat = memory.conversation()
        chat.send("the kestrel hovers above the meadow")
        chat.append({"role": "user", "content": "lasagna needs a slow oven"})
        chat.extend([{"role": "assistant", "content": "hovering falcons, indeed"}])
        with chat.stream("streamed words") as stream:
            assert "".join(stream)
        wait_for(lambda: len(stored_vectors(memory)) == 6)
        assert chat.embed_pending() == 0
        assert {d for _, _, d in stored_vectors(memory)} == {64}
        assert memory._embedder.last_error is None
        # The vector scan finds "hovering" for "hovers ... kestrel" only by
        # shared words here (the test model has no meaning), and fusion
        # puts the messages both lists found first.
        found = fused(memory, chat, "kestrel hovers")
        assert {(c.position, c.hit is not None) for c in found[:2]} == {(0, True), (1, True)}
        assert all(c.similarity is None or c.similarity > 0 for c in found)
        assert 2 not in {c.position for c in found}  # shares no word: not a candidate
        strict = fused(memory, chat, "kestrel hovers", min_similarity=0.99)
        assert [c.similarity for c in strict] == [None] * len(strict)
        assert {c.position for c in strict} == {0, 1}  # the words still find them
        assert [c.position for c in fused(memory, chat, "kestrel hovers", before=1)] == [0]
        inputs = [text for r in server.embedding_requests for text in r.body["input"]]
        assert inputs.count("the kestrel hovers above the meadow") == 1
        copy = memory.import_conversation(chat.export(), new_id=True)  # embedded as well
        wait_for(lambda: len(stored_vectors(memory, copy.id)) == 6)


def test_a_failing_endpoint_never_fails_a_turn_and_the_gaps_are_filled_later(db_url):
    with served(db_url) as (server, memory):
        chat = memory.conversation()
        server.fail(Fault.status(500), times=1000, route="embeddings")
        for n in range(3):
            chat.send(f"turn number {n} about wombats")
        assert len(chat) == 6
        wait_for(lambda: memory._embedder.last_error is not None)
        assert isinstance(memory._embedder.last_error, ServerError)
        assert stored_vectors(memory) == []
        with pytest.raises(ServerError):
            chat.embed_pending()
        server.reset()  # the endpoint is back
        assert chat.embed_pending() == 6
        assert [p for _, p, _ in stored_vectors(memory)] == list(range(6))


def test_batches_stored_before_a_failure_stay_stored(tmp_path):
    healthy = True

    def embedder(texts, dimensions):
        # An answer with no vectors for a poisoned batch: the server's 500.
        if not healthy and any("poison" in text for text in texts):
            return []
        return [hashed_embedding(text) for text in texts]

    settings = Embeddings(EMBED, batch=2, background=False)
    with served(tmp_path / "a.db", embeddings=settings, embedder=embedder) as (server, memory):
        chat = memory.conversation()
        chat.extend([{"role": "user", "content": w} for w in ("a", "b", "poison", "d", "e")])
        healthy = False
        with pytest.raises(ServerError, match="0 vectors for 2 inputs"):
            chat.embed_pending()
        assert [p for _, p, _ in stored_vectors(memory)] == [0, 1]
        healthy = True
        assert chat.embed_pending() == 3
        assert [p for _, p, _ in stored_vectors(memory)] == list(range(5))
        sent = [r.body["input"] for r in server.embedding_requests]
        assert sent == [["a", "b"], ["poison", "d"], ["poison", "d"], ["e"]]


def test_a_message_without_text_gets_an_empty_vector_and_is_not_asked_again(tmp_path):
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    settings = Embeddings(EMBED, background=False)
    with served(tmp_path / "a.db", embeddings=settings) as (server, memory):
        chat = memory.conversation()
        chat.extend([
            {"role": "user", "content": "weather?"},
            {"role": "user", "content": [picture]},
            {"role": "assistant", "content": "sunny"},
        ])  # fmt: skip
        assert stored_vectors(memory) == []  # background=False: only explicit runs
        assert chat.embed_pending() == 3
        assert [d for _, _, d in stored_vectors(memory)] == [64, 0, 64]
        assert chat.embed_pending() == 0
        assert [r.body["input"] for r in server.embedding_requests] == [["weather?", "sunny"]]


def test_delete_and_erase_remove_vectors_and_a_fork_reembeds_what_it_was_handed(db_url):
    settings = Embeddings(EMBED, background=False)
    with served(db_url, embeddings=settings) as (_, memory):
        parent = memory.conversation(user="ann")
        parent.extend([{"role": "user", "content": t} for t in ("shared emu", "later emu")])
        fork = parent.fork(at=0)
        fork.append({"role": "user", "content": "fork emu"})
        other = memory.conversation(user="bob")
        other.append({"role": "user", "content": "bob's emu"})
        for chat in (parent, fork, other):
            chat.embed_pending()
        assert len(stored_vectors(memory)) == 4
        assert {c.position for c in fused(memory, fork, "emu")} == {0, 1}

        parent.delete()  # the fork is handed a copy of the message it shared
        assert stored_vectors(memory, parent.id) == []
        assert stored_vectors(memory, fork.id) == [(fork.id, 1, 64)]
        assert fork.embed_pending() == 1
        assert {c.position for c in fused(memory, fork, "emu")} == {0, 1}

        memory.erase_user("ann")
        assert stored_vectors(memory) == [(other.id, 0, 64)]


def test_the_scan_reads_only_new_rows_and_notices_a_conversation_imported_again(db_url):
    settings = Embeddings(EMBED, background=False)
    with served(db_url, embeddings=settings) as (_, memory):
        chat = memory.conversation()
        chat.append({"role": "user", "content": "otters hold hands"})
        chat.embed_pending()
        assert [c.position for c in fused(memory, chat, "otters")] == [0]
        chat.append({"role": "user", "content": "sleeping otters drift"})
        chat.embed_pending()
        assert next(c.position for c in fused(memory, chat, "sleeping otters")) == 1
        exported = chat.export()
        chat.delete()
        copy = memory.import_conversation(exported.replace("otters", "beavers"))
        assert copy.id == chat.id
        copy.embed_pending()
        assert fused(memory, copy, "otters") == []  # nothing left of the old vectors
        assert next(c.position for c in fused(memory, copy, "sleeping beavers")) == 1


def test_nearest_checks_its_arguments(tmp_path):
    with Memory(tmp_path / "a.db") as memory, memory.database.read() as conn:
        store = memory._store.vectors
        with pytest.raises(ConfigurationError, match="limit"):
            store.nearest(conn, [("x", None)], EMBED, [1.0], limit=0)
        assert store.nearest(conn, [("x", None)], EMBED, [0.0, 0.0]) == []
        assert store.nearest(conn, [("x", None)], EMBED, [1.0, 0.0]) == []
        with pytest.raises(ConfigurationError, match="limit"):
            vectors.fused_search(conn, store, [("x", None)], "words", limit=0)


def test_async_memory_embeds_in_a_task_and_resumes(db_url):
    async def main():
        with ChatServer() as server:
            client = server.async_client()
            async with AsyncMemory(db_url, client=client, model=MODEL, embeddings=EMBED) as memory:
                chat = await memory.conversation()
                server.fail(Fault.status(500), times=1, route="embeddings")
                await chat.send("platypus facts")
                await asyncio.sleep(0)
                for _ in range(500):
                    if not memory._embedder._tasks:
                        break
                    await asyncio.sleep(0.01)
                assert isinstance(memory._embedder.last_error, ServerError)
                await chat.append({"role": "user", "content": "more platypus"})
                for _ in range(500):
                    if len(stored_vectors(memory)) == 3:
                        break
                    await asyncio.sleep(0.01)
                assert [p for _, p, _ in stored_vectors(memory)] == [0, 1, 2]
                assert await chat.embed_pending() == 0
            await client.close()

    asyncio.run(main())


def test_an_in_memory_database_embeds_right_after_the_turn_and_never_fails_it():
    with served(":memory:") as (server, memory):
        chat = memory.conversation()
        chat.send("numbats eat termites")
        assert memory._embedder._thread is None  # one shared connection: no second thread
        assert [p for _, p, _ in stored_vectors(memory)] == [0, 1]
        server.fail(Fault.status(500), route="embeddings")
        chat.send("numbats are striped")
        assert isinstance(memory._embedder.last_error, ServerError)
        assert len(chat) == 4
        chat.append({"role": "user", "content": "and small"})  # this run takes up the rest
        assert [p for _, p, _ in stored_vectors(memory)] == [0, 1, 2, 3, 4]


def test_reading_a_conversation_never_embeds():
    """Only what stores messages hands them to the embedder: context(), state(),
    prepare() and compact() read, and cost no embeddings request."""
    with served(":memory:") as (server, memory):
        chat = memory.conversation()
        server.fail(Fault.status(500), route="embeddings")
        chat.append({"role": "user", "content": "numbats eat termites"})  # left unembedded
        asked = len(server.embedding_requests)
        chat.context()
        chat.state()
        chat.prepare("and ants?")
        chat.compact()
        assert len(server.embedding_requests) == asked
        chat.append({"role": "assistant", "content": "They do."})
        assert len(server.embedding_requests) == asked + 1


def test_async_memory_refuses_a_sync_embeddings_client(tmp_path):
    async def main():
        with ChatServer() as server, server.client() as sync_client:
            wrong = Embeddings(EMBED, client=sync_client)
            client = server.async_client()
            with pytest.raises(ConfigurationError, match=r"must be an openai\.AsyncOpenAI"):
                async with AsyncMemory(tmp_path / "a.db", client=client, embeddings=wrong):
                    pass
            await client.close()
        assert not (tmp_path / "a.db").exists()

    asyncio.run(main())


def test_a_malformed_embeddings_answer_is_a_model_error_and_stores_nothing(tmp_path):
    def embedder(texts, dimensions):
        return [[1.0, 0.0]] + [[1.0, 0.0, 0.0]] * (len(texts) - 1)

    settings = Embeddings(EMBED, background=False)
    with served(tmp_path / "a.db", embeddings=settings, embedder=embedder) as (_, memory):
        chat = memory.conversation()
        chat.extend([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
        with pytest.raises(MalformedResponse, match="different lengths"):
            chat.embed_pending()
        assert stored_vectors(memory) == []


def test_the_scan_cache_keeps_within_its_bytes(tmp_path):
    settings = Embeddings(EMBED, background=False)
    with served(tmp_path / "a.db", embeddings=settings) as (_, memory):
        chats = [memory.conversation() for _ in range(3)]
        for chat in chats:
            chat.extend([{"role": "user", "content": f"quokka {n}"} for n in range(70)])
            chat.embed_pending()
        store = vectors.VectorStore(memory.database, cache_bytes=1)
        query = hashed_embedding("quokka 5")
        with memory.database.read() as conn:
            for chat in chats:
                assert store.nearest(conn, [(chat.id, None)], EMBED, query)[0].position == 5
                assert list(store._blocks) == [(chat.id, EMBED)]  # the others were dropped


def test_migration_0004_goes_down_and_up_again(db_url):
    from alembic import command

    from conversation_memory.store import migrate

    with Memory(db_url) as memory:
        db = memory.database
        with db.engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0003")
        assert "message_vectors" not in sa.inspect(db.engine).get_table_names()
        assert migrate.upgrade(db) == migrate.HEAD
        assert "message_vectors" in sa.inspect(db.engine).get_table_names()
        assert migrate.check(db) == []


def test_without_numpy_the_setting_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from conversation_memory import ConfigurationError, Memory\n"
        "try:\n"
        f"    Memory({str(tmp_path / 'a.db')!r}, embeddings='e')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'conversation-memory[embeddings]'" in result.stdout
    assert not (tmp_path / "a.db").exists()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2**32 - 1)), min_size=1, max_size=5),
    limit=st.integers(1, 8),
    before=st.one_of(st.none(), st.integers(0, 30)),
)
def test_the_cached_scan_finds_what_a_full_scan_finds(tmp_path_factory, steps, limit, before):
    """Vectors stored in rounds between scans, across a fork: the kept matrix, topped
    up with the new rows only, ranks as a fresh store reading everything does."""
    path = tmp_path_factory.mktemp("scan") / "a.db"
    rng = np.random.default_rng(len(steps))
    with Memory(path) as memory:
        parent = memory.conversation()
        parent.extend([{"role": "user", "content": "p"}] * 3)
        chat = parent.fork(at=1)
        parent.append({"role": "user", "content": "after the fork"})
        kept = vectors.VectorStore(memory.database)
        save = memory._store.vectors.save
        save(EMBED, [vectors.NewVector(parent.id, p, _unit(rng)) for p in range(4)])
        segments = chat._log.lineage()
        for count, seed in steps:
            stored = chat.extend([{"role": "user", "content": "c"}] * count)
            save(EMBED, [vectors.NewVector(chat.id, s.position, _unit(rng)) for s in stored])
            query = np.random.default_rng(seed).standard_normal(DIMS)
            with memory.database.read() as conn:
                cached = kept.nearest(conn, segments, EMBED, query, limit=limit, before=before)
                fresh = vectors.VectorStore(memory.database).nearest(
                    conn, segments, EMBED, query, limit=limit, before=before
                )
            assert [(n.conversation_id, n.position) for n in cached] == [
                (n.conversation_id, n.position) for n in fresh
            ]
            assert all(n.position < before for n in cached if before is not None)
            assert (parent.id, 2) not in {(n.conversation_id, n.position) for n in cached}


DIMS = 8


def _unit(rng) -> bytes:
    vector = rng.standard_normal(DIMS).astype("<f4")
    return (vector / np.linalg.norm(vector)).astype("<f4").tobytes()
