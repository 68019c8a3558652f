"""The rows a conversation last read are reused only while they are provably current.

A ``Conversation`` keeps the tail rows of its last read (``store.tailcache``)
and reuses them while the conversation's head row is unchanged. Each test
here changes the conversation behind the object's back, from another
``Memory`` on the same database (as another process would), and checks that
the next context is exactly what a fresh object reads.
"""

from __future__ import annotations

import pytest

from conversation_memory import Memory


def fresh_context(db: str, conversation_id: str) -> list[dict]:
    with Memory(db) as other:
        return other.conversation(conversation_id).context().messages


def fill(conversation, texts) -> None:
    for n, text in enumerate(texts):
        role = "user" if n % 2 == 0 else "assistant"
        conversation.append({"role": role, "content": text})


def test_appends_from_elsewhere_are_seen(db_url: str) -> None:
    with Memory(db_url) as memory, Memory(db_url) as other:
        chat = memory.conversation()
        fill(chat, [f"mine {n}" for n in range(6)])
        before = chat.context().messages  # the rows are now kept
        other.conversation(chat.id).append({"role": "user", "content": "from elsewhere"})
        after = chat.context().messages
        assert after[-1] == {"role": "user", "content": "from elsewhere"}
        assert after[:-1] == before
        assert after == fresh_context(db_url, chat.id)
        # A turn of its own after a foreign append: the claim shows something came
        # between, so nothing stale is kept.
        other.conversation(chat.id).append({"role": "assistant", "content": "also elsewhere"})
        chat.append({"role": "user", "content": "mine again"})
        assert chat.context().messages == fresh_context(db_url, chat.id)
        assert [m["content"] for m in chat.context().messages][-3:] == [
            "from elsewhere",
            "also elsewhere",
            "mine again",
        ]


def test_a_conversation_deleted_and_imported_again_is_read_afresh(db_url: str) -> None:
    with Memory(db_url) as memory, Memory(db_url) as other:
        chat = memory.conversation()
        fill(chat, ["one", "two", "three", "four"])
        exported = chat.export()
        fill(chat, ["five", "six"])
        assert chat.context().messages[-1]["content"] == "six"  # rows kept
        # Elsewhere: deleted, and the older export imported under the same id,
        # then continued with other words to the same length.
        other.conversation(chat.id).delete()
        again = other.import_conversation(exported)
        fill(again, ["FIVE", "SIX"])
        assert [m["content"] for m in chat.context().messages] == [
            "one",
            "two",
            "three",
            "four",
            "FIVE",
            "SIX",
        ]
        assert chat.history() == again.history()


def test_what_a_caller_changes_in_a_context_changes_nothing_kept(tmp_path) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with Memory(tmp_path / "c.db") as memory:
        chat = memory.conversation()
        chat.append({"role": "user", "content": [{"type": "text", "text": "parts"}]})
        chat.append({"role": "assistant", "content": None, "tool_calls": [call]})
        chat.append({"role": "tool", "tool_call_id": "call_1", "content": "result"})
        first = chat.context().messages
        first[0]["content"][0]["text"] = "changed by the caller"
        first[1]["tool_calls"][0]["function"]["name"] = "changed"
        chat.state().tail[-1].message["content"] = "changed too"  # type: ignore[index]
        assert chat.context().messages == fresh_context(str(tmp_path / "c.db"), chat.id)
        assert chat.context().messages[0]["content"][0]["text"] == "parts"


def test_a_fork_whose_parent_is_deleted_reads_its_own_copy(db_url: str) -> None:
    with Memory(db_url) as memory, Memory(db_url) as other:
        parent = memory.conversation()
        fill(parent, ["a", "b", "c", "d"])
        child = parent.fork(at=2)
        child.append({"role": "assistant", "content": "child's own"})
        before = child.context().messages
        other.conversation(parent.id).delete()
        assert child.context().messages == before == fresh_context(db_url, child.id)


@pytest.mark.parametrize("threads", [4])
def test_threads_sharing_one_conversation_never_see_a_stale_tail(tmp_path, threads: int) -> None:
    import threading

    with Memory(tmp_path / "c.db") as memory:
        chat = memory.conversation()
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(25):
                    chat.append({"role": "user", "content": f"thread {n} message {i}"})
                    messages = chat.context().messages
                    assert {"role": "user", "content": f"thread {n} message {i}"} in messages
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        assert chat.context().messages == fresh_context(str(tmp_path / "c.db"), chat.id)
