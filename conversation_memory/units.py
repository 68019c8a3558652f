"""Units: the stored messages that are sent together or not at all, and a selection of them.

Tool calls make some messages inseparable. An assistant message with
``tool_calls`` and the run of tool messages right after it that answer those
calls form a *unit*: it is sent whole or not at all. Every other message is a
unit of its own, and a user message's unit starts a *turn*: the question with
everything that answers it (replies, tool calls and their results), up to the
next user message. Strategies keep and drop whole units, and whole turns
where they can (see :func:`~conversation_memory.strategies.keep_newest`).

History is not always tidy (a crash between a call and its results, a user
who typed before the results came), so units are *repaired* before they are
sent: calls that were never answered are taken out of ``tool_calls`` (the key
goes when none are left, and the whole message when it then says nothing).
Tool messages that answer no call of their unit are *orphans* and are never
sent. Repairs change only what is sent, never what is stored, and the report
lists them.

A strategy's answer is a :class:`Selection`: the items to send, in order,
the summary (or summaries) to send with them, and what was left out. Pure: no
I/O, and work linear in the number of items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from conversation_memory.types import Item, Recalled, Summary

__all__ = ["Selection", "Unit", "group_units"]


@dataclass(slots=True)
class Unit:
    """Stored messages that are sent together or not at all.

    Not frozen, unlike the other values: every request groups each message of
    its tail into one (:func:`group_units`), and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) cost four times a plain
    one, a fifth of building a context. Nothing changes a unit once grouped.
    """

    source: tuple[Item, ...]
    """The stored items, as read."""
    items: tuple[Item, ...]
    """What may be sent: ``source`` after repair; empty for an orphan."""
    tokens: int
    """Tokens of ``items`` (a repaired message keeps its stored count: an upper bound)."""
    pinned: bool
    """Some item of the unit is pinned, so the whole unit is kept."""
    has_user: bool
    """The unit is a user message: a turn starts here."""
    repaired: tuple[int, ...] = ()
    """Positions of assistant messages whose unanswered calls were taken out."""


def _unit(
    source: tuple[Item, ...], items: tuple[Item, ...], repaired: tuple[int, ...] = ()
) -> Unit:
    return Unit(
        source=source,
        items=items,
        tokens=sum(item.tokens for item in items),
        pinned=any(item.pinned for item in source),
        has_user=source[0].message.get("role") == "user",
        repaired=repaired,
    )


def _call_id(call: Any) -> Any:
    return call.get("id") if isinstance(call, Mapping) else None


def _tool_unit(caller: Item, run: Sequence[Item]) -> Unit:
    """The unit of ``caller`` and the tool messages in ``run`` right after it."""
    calls = caller.message.get("tool_calls") or ()
    wanted = {_call_id(call) for call in calls}
    answers: list[Item] = []
    seen: set[Any] = set()
    for item in run:
        call_id = item.message.get("tool_call_id")
        if isinstance(call_id, str) and call_id in wanted and call_id not in seen:
            seen.add(call_id)
            answers.append(item)
    source = (caller, *run)
    if calls and len(seen) == len(calls):  # each call answered once, ids distinct
        return _unit(source, (caller, *answers))
    kept_calls = []
    for call in calls:
        call_id = _call_id(call)
        if call_id in seen:
            seen.discard(call_id)  # a repeated id keeps only its first call
            kept_calls.append(call)
    message = dict(caller.message)
    if kept_calls:
        message["tool_calls"] = kept_calls
    else:
        del message["tool_calls"]
    head: tuple[Item, ...] = ()
    if kept_calls or message.get("content") not in (None, "", [], ()):
        head = (replace(caller, message=message),)
    return _unit(source, (*head, *answers), (caller.position,))


def group_units(items: Sequence[Item]) -> list[Unit]:
    """Split consecutive stored items into units, repairing broken tool-call units.

    Every item lands in exactly one unit's ``source``, in order. Tool messages
    that answer no call of their unit are in its ``source`` but not its ``items``;
    a tool message with no assistant message before its run is a unit of its own
    with nothing to send.
    """
    units: list[Unit] = []
    n = len(items)
    i = 0
    while i < n:
        item = items[i]
        message = item.message
        role = message.get("role")
        if role == "assistant" and "tool_calls" in message:
            j = i + 1
            while j < n and items[j].message.get("role") == "tool":
                j += 1
            units.append(_tool_unit(item, items[i + 1 : j]))
            i = j
        elif role == "tool":
            units.append(_unit((item,), ()))
            i += 1
        else:
            # The common case, built directly: this runs for every message of every turn.
            single = (item,)
            units.append(Unit(single, single, item.tokens, item.pinned, role == "user"))
            i += 1
    return units


@dataclass(frozen=True, slots=True)
class Selection:
    """What a strategy chose to send."""

    items: tuple[Item, ...]
    """Messages to send, in order: system, older pinned, then the kept tail (after repair)."""
    summary: Summary | None
    """Summary to send, placed after the system prompt and older pinned messages."""
    dropped: tuple[Item, ...]
    """Tail items left out to fit, oldest first (a prefix of the tail, pinned ones excepted)."""
    summaries: tuple[Summary, ...] = ()
    """Several summaries to send instead, oldest first, each its own message."""
    fold_through: int | None = None
    """A summarizing strategy's request: fold every message after the current
    summary up to this position (inclusive) into a new summary. Compaction acts
    on it; the messages to send are already chosen without it."""
    recalled: tuple[Recalled, ...] = ()
    """Earlier turns to send in the recall message (after the summaries, before the
    tail), oldest first: a recalling strategy's choice from ``State.recalled``."""
