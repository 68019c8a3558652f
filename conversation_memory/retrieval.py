"""The recall message: earlier turns brought back into a request, as one delimited message.

A recalling strategy (:class:`~conversation_memory.recall.Recall`) sends the
earlier turns a search found in one message of their own, after the summary
and before the newest turns. It is a ``system`` message, like the summary's:
history after the system part must begin with a user message, so a ``user``
message here would break the whole-turn rule, and the fixed header tells the
model (and a reader) that what follows is quoted from earlier, not said now::

    Earlier messages that may be relevant (messages 12-13, 301-302 of 1,240):

    [12 user] what is the code of the side door?
    [13 assistant] It is 4711.

The turns stand oldest first; each line is one stored message with its
position and role (tool calls as ``name(arguments)``). Costs are counted when
the turns are read (:func:`costed`), each an upper bound of what it adds, so a
strategy can choose within its budget without a token counter. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from conversation_memory.types import Item, Recalled

__all__ = ["costed", "recall_message", "turn_text"]

_HEAD = "Earlier messages that may be relevant (messages "
_SLACK = 2
"""Tokens added to each counted piece: text split where pieces meet may count a token
differently than the pieces alone (it rarely does, and never by more)."""


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        pieces = [content]
    elif isinstance(content, Sequence):
        pieces = [
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        ]
    else:
        pieces = []
    for call in message.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, Mapping) else {}
        pieces.append(f"{function.get('name', '')}({function.get('arguments', '')})")
    return " ".join(" ".join(piece.split()) for piece in pieces if piece)


def turn_text(items: Iterable[Item]) -> str:
    """One turn as the recall message shows it: a line per message."""
    return "\n".join(
        f"[{item.position} {item.message.get('role')}] {_text(item.message)}" for item in items
    )


def _span(turn: Recalled) -> str:
    return f"{turn.start}" if turn.start == turn.end else f"{turn.start}\u2013{turn.end}"


def _header(spans: Sequence[str], of: int) -> str:
    return f"{_HEAD}{', '.join(spans)} of {of:,}):"


def recall_message(turns: Sequence[Recalled], of: int) -> dict[str, Any]:
    """The message that carries ``turns`` (oldest first) of a conversation of ``of`` messages."""
    body = "".join(f"\n\n{turn.text}" for turn in turns)
    return {"role": "system", "content": _header([_span(t) for t in turns], of) + body}


def costed(
    found: Iterable[tuple[float, Sequence[Item]]],
    of: int,
    count_text: Callable[[str], int],
    count_message: Callable[[Mapping[str, Any]], int],
) -> tuple[tuple[Recalled, ...], int]:
    """The turns a search found, rendered and counted, and the message's own overhead.

    The recall message with any of them costs at most the overhead plus their
    ``tokens``: the overhead is the message with its header and no turn, and each
    turn adds its text and its range in the header (counted apart, with slack).
    """
    turns = []
    for score, items in found:
        turn = Recalled(items=tuple(items), score=score, text=turn_text(items))
        tokens = count_text(f"\n\n{turn.text}") + count_text(f", {_span(turn)}") + 2 * _SLACK
        turns.append(replace(turn, tokens=tokens))
    if not turns:
        return (), 0
    return tuple(turns), count_message(recall_message((), of)) + _SLACK
