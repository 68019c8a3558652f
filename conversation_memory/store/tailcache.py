"""The newest rows of one conversation as last read, kept while nothing changed.

Building a context reads the tail of the log on every turn, and most of that
read is the same rows as last time: the log is append-only and a stored
message never changes. Measured on a 10,000-message conversation with 88
rows in its tail, fetching them was 0.26 ms of a 0.9 ms context, the same
work raw ``sqlite3`` does. So a conversation log keeps the rows it last read
(plain tuples of column values, never the dicts or items built from them:
every read still builds fresh ones, so a caller that changes what it was
given changes nothing here) and reuses them while the conversation is
provably the one it read them from.

*Provably*: each read takes the conversation's head row in its own snapshot
first. The rows are reused only if the head still shows the same next
position, message count, token total, last-activity stamp and fork pointer
as when they were read. Any append anywhere (another process, another
thread) moves the position and the stamp; deleting and re-creating the
conversation under the same id (an import) gives a different stamp and
counts unless it restores exactly the state that was read, whose rows are
the same. A fork whose parent is deleted gets a new fork pointer. Summaries
and pinned messages are read every time; only the tail's rows are kept.
This log's own commits extend the kept rows with what they inserted when the
claim shows nothing came between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conversation_memory.store.values import Head, NewMessage

Row = tuple[Any, ...]
"""A tail row: position, role, content, parts, name, tool_calls, tool_call_id,
tokens, pinned, complete (``statements.TAIL``)."""
Token = tuple[Any, ...]

MAX_ROWS = 4096
"""The most rows kept (a tail longer than that is read from the database)."""


def token_of(head: Head) -> Token:
    return (
        head.next_position,
        head.message_count,
        head.total_tokens,
        head.updated_at,
        head.forked_from,
        head.fork_position,
    )


class TailCache:
    """The rows of the newest positions, newest first, and the head they belong to."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        # One tuple, replaced whole: threads sharing a log read a consistent pair.
        self._kept: tuple[Token, Sequence[Row]] | None = None

    def rows(self, head: Head) -> Sequence[Row]:
        """The kept rows, if ``head`` says the conversation is as it was; else none."""
        kept = self._kept
        if kept is None or kept[0] != token_of(head):
            return ()
        return kept[1]

    def keep(self, head: Head, rows: Sequence[Row]) -> None:
        """Keep the rows a read used (newest first; they end at the newest position)."""
        if rows and rows[0][0] == head.next_position - 1 and len(rows) <= MAX_ROWS:
            self._kept = (token_of(head), rows)
        else:
            self._kept = None

    def appended(
        self,
        batch: Sequence[NewMessage],
        first: int,
        after: tuple[int, int, int],
        stamp: Any,
    ) -> None:
        """Extend the kept rows with a commit of ``batch`` at ``first``, which left the
        row at ``after`` (next position, message count, token total) and ``stamp``."""
        kept = self._kept
        if kept is None:
            return
        token, rows = kept
        total = sum(pending.row["tokens"] for pending in batch)
        before = (after[0] - len(batch), after[1] - len(batch), after[2] - total)
        if token[:3] != before or first != before[0]:
            self._kept = None  # something came between: read afresh next time
            return
        new = [
            (
                position,
                pending.row["role"],
                pending.row["content"],
                pending.row["parts"],
                pending.row["name"],
                pending.row["tool_calls"],
                pending.row["tool_call_id"],
                pending.row["tokens"],
                pending.pinned,
                pending.complete,
            )
            for position, pending in enumerate(batch, start=first)
        ]
        new.reverse()
        self._kept = ((*after, stamp, *token[4:]), [*new, *rows][:MAX_ROWS])

    def clear(self) -> None:
        self._kept = None


__all__ = ["MAX_ROWS", "TailCache", "token_of"]
