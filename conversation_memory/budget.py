"""What one request may hold, and the request assembled from a strategy's choice.

The limits: a model's :class:`~conversation_memory.types.Budget`
(:func:`budget_for`), the largest prompt that fits it (:func:`largest_fit`),
and the error for a request whose must-send part alone is over it
(:func:`too_big`). Strategies choose within them.

The request: :func:`assemble` turns a strategy's
:class:`~conversation_memory.units.Selection` into the exact message list (the
summary messages, :func:`summary_message`, then the recall message of earlier
turns, :func:`~conversation_memory.retrieval.recall_message`, placed before the
tail), checks it
(the message rules and whole turns, :func:`~conversation_memory.messages.validate`,
and the budget) and reports what each part costs (:class:`Report`, and
:func:`explain` for people). Running the strategy that makes the selection is
:func:`~conversation_memory.fitting.build`'s job, a floor up, so nothing here
knows any strategy.

The accounting is the one the server applies: the prompt is the sum of each
sent message's stored token count (per-message overhead included), the
summary message's count, and :data:`REPLY_PRIMING`; it must pass
``budget.fits`` (which applies the calibration correction). Everything here is
pure: no I/O, no clock, and work linear in the number of messages read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conversation_memory.errors import BudgetExceeded, InvalidPayload
from conversation_memory.messages import validate
from conversation_memory.registry import get_model
from conversation_memory.retrieval import recall_message
from conversation_memory.tokens import REPLY_PRIMING
from conversation_memory.types import Budget, Item, Recalled, State, Summary
from conversation_memory.units import Selection

__all__ = [
    "MAX_RESERVE",
    "Context",
    "Report",
    "Retrieved",
    "assemble",
    "budget_for",
    "explain",
    "largest_fit",
    "summary_message",
    "too_big",
]

MAX_RESERVE = 4096
"""Default reply reserve: the model's output limit, but at most this much."""


# --- limits ---------------------------------------------------------------------------


def budget_for(
    model: str,
    *,
    reserve: int | None = None,
    tools: int = 0,
    margin: int = 0,
    cap: int | None = None,
) -> Budget:
    """The budget for ``model`` from the registry (raises ``UnknownModel``); the reply
    reserve defaults to the model's ``max_output``, at most :data:`MAX_RESERVE`."""
    info = get_model(model)
    if reserve is None:
        reserve = min(info.max_output, MAX_RESERVE)
    return Budget(window=info.window, reserve=reserve, tools=tools, margin=margin, cap=cap)


def _limit_terms(budget: Budget) -> str:
    terms = f"window {budget.window} - reserve {budget.reserve}"
    if budget.tools:
        terms += f" - tools {budget.tools}"
    if budget.margin:
        terms += f" - margin {budget.margin}"
    if budget.cap is not None:
        terms += f", capped at {budget.cap}"
    return terms


def largest_fit(budget: Budget) -> int:
    """The largest prompt, in our own tokens, that ``budget.fits`` (-1 if not even 0 does).

    ``fits`` never turns false as the count grows (the factor is positive), so
    ``count <= largest_fit(budget)`` is ``budget.fits(count)``: the selection loops
    compare integers instead of applying the correction once per unit. The
    estimate from the factor is checked with ``fits`` itself, so float rounding
    can't move it.
    """
    fits = budget.fits
    # Within a token or two of the answer (the factor is at least MIN_FACTOR, so the
    # quotient is an ordinary number); walk to the exact boundary with ``fits``.
    found = max(
        math.floor((budget.limit - budget.correction.margin) / budget.correction.factor), -1
    )
    while found >= 0 and not fits(found):
        found -= 1
    while fits(found + 1):
        found += 1
    return found


def too_big(budget: Budget, *, system: int, pinned: int, newest: int) -> BudgetExceeded:
    """The error for a request whose must-send part alone is over the limit."""
    total = system + pinned + newest + REPLY_PRIMING
    corrected = budget.correction.apply(total)
    shown = f"{total}" if corrected == total else f"{total} ({corrected} after calibration)"
    return BudgetExceeded(
        f"the system prompt ({system} tokens), pinned messages ({pinned}), the newest message "
        f"({newest}, with the tool results that answer it) and reply priming ({REPLY_PRIMING}) "
        f"need {shown} prompt tokens, but the "
        f"limit is {budget.limit} ({_limit_terms(budget)}). Give a bigger budget or a model "
        "with a larger window, a smaller reply reserve, a shorter system prompt or newest "
        "message, or unpin messages.",
        needed=corrected,
        limit=budget.limit,
        system=system,
        pinned=pinned,
        newest=newest,
    )


# --- the summary message --------------------------------------------------------------


def summary_message(summary: Summary) -> dict[str, Any]:
    """The message that carries ``summary`` (its stored ``tokens`` must count this message).

    A system message of its own, never merged into the system prompt, and
    marked by a fixed header so neither the model nor a reader takes it for
    something anyone said.
    """
    level = f", level {summary.level}" if summary.level else ""
    return {
        "role": "system",
        "content": (
            f"Summary of the earlier conversation (messages {summary.start} to "
            f"{summary.end}{level}):\n{summary.text}"
        ),
    }


# --- the request ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retrieved:
    """An earlier turn sent in the recall message: where it stands, its score, its cost."""

    first: int
    last: int
    """Its positions, ``first..last``."""
    score: float
    """How well it matched the search (higher is better)."""
    tokens: int
    """What it adds to the recall message (an upper bound)."""


@dataclass(frozen=True, slots=True)
class Report:
    """Where the tokens of one request go, and what was left out."""

    strategy: str
    system: int
    pinned: int
    summary: int
    messages: int
    """Tokens of the sent tail messages that are not pinned."""
    priming: int
    tools: int
    """Tokens of the tool definitions; already taken off ``limit``, not part of ``total``."""
    total: int
    """system + pinned + summary + messages + priming: what is checked against ``limit``."""
    corrected: int
    """``total`` after the calibration correction (what the server is expected to count)."""
    limit: int
    window: int
    reserve: int
    margin: int
    cap: int | None
    utilization: float
    """``corrected / limit``."""
    sent: int
    """Number of messages in the payload (the summary included)."""
    pinned_sent: int
    """Number of pinned messages sent."""
    messages_sent: int
    """Number of tail messages sent that are not pinned."""
    dropped: int
    """Messages left out that no summary sent represents: still stored, just not sent."""
    first_dropped: int | None
    last_dropped: int | None
    repaired: tuple[int, ...] = ()
    """Positions of assistant messages sent with unanswered tool calls taken out (or left out)."""
    orphaned: tuple[int, ...] = ()
    """Positions of tool messages left out because their call is not sent with them."""
    covered: int = 0
    """Messages left out because a summary that is sent represents them."""
    summary_omitted: bool = False
    """A summary exists but did not fit next to what must be sent (what it covers is
    then counted in ``dropped``)."""
    overlap: int = 0
    """Messages sent as they are although a summary sent represents them too: the
    ``summary`` strategy fills the room beside the summary with the newest turns."""
    partial_turn: int | None = None
    """Position of the newest turn's question when that turn alone is larger than the
    budget and only its newest part is sent, without it (else None)."""
    recall: int = 0
    """Tokens of the recall message (0 when none is sent)."""
    recalled: tuple[Retrieved, ...] = ()
    """The earlier turns the recall message carries, oldest first."""

    @property
    def retrieved(self) -> frozenset[int]:
        """Positions of the messages sent inside the recall message."""
        return frozenset(p for turn in self.recalled for p in range(turn.first, turn.last + 1))

    @property
    def prompt(self) -> int:
        """``total`` plus the tool definitions: the prompt size as the server reports it."""
        return self.total + self.tools


@dataclass(frozen=True, slots=True)
class Context:
    """The next request: the exact messages, where they came from, and the report."""

    messages: list[dict[str, Any]]
    items: tuple[Item, ...]
    summary: Summary | None
    """The (newest) summary sent, if any."""
    report: Report
    summaries: tuple[Summary, ...] = ()
    """Every summary sent, oldest first (one, or a hierarchical cover)."""
    fold_through: int | None = None
    """The strategy's request to fold messages up to here into a summary."""
    summary_index: int = 0
    """Where the summary messages start in ``messages``: before it stand ``items[:i]``,
    then one message per summary, the recall message (if any), then the rest of ``items``."""
    recalled: tuple[Recalled, ...] = ()
    """The earlier turns sent in the recall message, oldest first."""


def assemble(state: State, budget: Budget, selection: Selection, *, strategy: str) -> Context:
    """The next request from ``selection`` (made by the strategy named ``strategy`` from
    ``state``): its messages, checked, and the report of what each part costs.

    Raises :class:`InvalidPayload` when the selection breaks the order or the rules
    between messages, and :class:`BudgetExceeded` when it is over the budget.
    """
    items = selection.items
    summary = selection.summary
    sent_summaries = selection.summaries or ((summary,) if summary is not None else ())
    recalled = selection.recalled
    tail_start = state.tail[0].position if state.tail else None
    # The summaries, then the recall message: what stands between the system part and
    # the tail (the recall message counts what its turns were counted for when read).
    preamble = [summary_message(each) for each in sent_summaries]
    recall = 0
    if recalled:
        _check_recalled(state, selection, strategy)
        preamble.append(recall_message(recalled, state.tail[-1].position + 1))
        recall = state.recall_overhead + sum(turn.tokens for turn in recalled)
    messages: list[dict[str, Any]] = []
    previous: int | None = None
    placed = not preamble
    summary_index = 0
    for item in items:
        if previous is not None and item.position <= previous:
            raise InvalidPayload(
                f"strategy {strategy!r} put position {item.position} after {previous}; "
                "messages must keep their order",
                index=len(messages),
            )
        previous = item.position
        if (
            not placed
            and tail_start is not None
            and item.position >= tail_start
            and item is not state.system
        ):
            summary_index = len(messages)
            messages.extend(preamble)
            placed = True
        messages.append(dict(item.message))
    if not placed:
        summary_index = len(messages)
        messages.extend(preamble)
    if state.system is not None and (not items or items[0] is not state.system):
        raise InvalidPayload(
            f"strategy {strategy!r} left out the system prompt or did not put it first",
            index=0,
        )
    validate(messages, history=_history_start(state, items, summary_index, len(preamble)))
    total = sum(item.tokens for item in items) + REPLY_PRIMING + recall
    total += sum(each.tokens for each in sent_summaries)
    if not budget.fits(total):
        raise BudgetExceeded(
            f"strategy {strategy!r} chose {total} prompt tokens, over the limit of "
            f"{budget.limit} ({_limit_terms(budget)})",
            needed=total,
            limit=budget.limit,
            strategy=strategy,
        )
    report = _report(
        state,
        budget,
        strategy=strategy,
        selection=selection,
        messages=messages,
        total=total,
        recall=recall,
    )
    return Context(
        messages=messages,
        items=items,
        summary=sent_summaries[-1] if sent_summaries else None,
        report=report,
        summaries=tuple(sent_summaries),
        fold_through=selection.fold_through,
        summary_index=summary_index,
        recalled=recalled,
    )


def _check_recalled(state: State, selection: Selection, strategy: str) -> None:
    """Recalled turns stand oldest first, apart, and none of their messages is sent raw."""
    sent = {item.position for item in selection.items}
    previous = -1
    for turn in selection.recalled:
        if not turn.items or turn.start <= previous or not state.tail:
            raise InvalidPayload(
                f"strategy {strategy!r} recalled turns out of order, overlapping or empty "
                "(they must stand oldest first, apart)"
            )
        if any(item.position in sent for item in turn.items):
            raise InvalidPayload(
                f"strategy {strategy!r} recalled messages {turn.start} to {turn.end}, "
                "which it also sends as they are"
            )
        previous = turn.end


def _history_start(state: State, items: Sequence[Item], summary_index: int, summaries: int) -> int:
    """Where the conversation's history starts in the payload: after the system prompt,
    the summaries and the pinned units before it (a pinned reply is sent whatever it
    answers), so at the first message the turn rule applies to."""
    at = 0
    while at < len(items):
        item = items[at]
        role = item.message.get("role")
        if item is state.system or role in ("system", "developer"):
            at += 1
        elif role != "user" and _in_pinned_unit(state, item):
            at += 1
            while at < len(items) and items[at].message.get("role") == "tool":
                at += 1  # the results of a pinned call
        else:
            break
    return at + (summaries if at >= summary_index else 0)


def _in_pinned_unit(state: State, item: Item) -> bool:
    """Whether ``item`` is pinned, or a call one of whose stored results is."""
    if item.pinned:
        return True
    tail = state.tail
    if "tool_calls" not in item.message or not tail:
        return False
    at = item.position - tail[0].position
    if not 0 <= at < len(tail) or tail[at].position != item.position:
        return False
    for answer in tail[at + 1 :]:
        if answer.message.get("role") != "tool":
            return False
        if answer.pinned:
            return True
    return False


def _report(
    state: State,
    budget: Budget,
    *,
    strategy: str,
    selection: Selection,
    messages: list[dict[str, Any]],
    total: int,
    recall: int,
) -> Report:
    sent = {item.position: item for item in selection.items}
    dropped = {item.position for item in selection.dropped}
    # Left out is either covered (a summary that is sent represents it) or dropped.
    # The summaries sent represent lo..hi; the state's summaries cover begin..end: what
    # they cover is left out even when it could not be sent (then it is dropped).
    cover = selection.summaries or ((selection.summary,) if selection.summary else ())
    lo, hi = (cover[0].start, cover[-1].end) if cover else (0, -1)
    known = state.summaries or ((state.summary,) if state.summary else ())
    begin, end = (known[0].start, known[-1].end) if known else (0, -1)
    start = state.tail[0].position if state.tail else end + 1 + state.older
    # Read although older than the tail: pinned messages (and a system prompt stored at 0).
    read = {item.position for item in state.pinned} | {p for p in sent if 0 <= p < start}
    covered = overlap = 0
    gone: list[tuple[int, int, int]] = []  # (first, last, how many) dropped, in order

    def unread(first: int, last: int) -> int:
        """How many of the messages first..last (older than the tail) were not read."""
        if last < first:
            return 0
        return last - first + 1 - sum(first <= p <= last for p in read)

    top = min(end, start - 1)  # the unread part of the summarized range ends here
    covered += unread(max(lo, 0), min(hi, top))
    for first, last in ((begin, min(lo - 1, top)), (max(hi + 1, begin), top)):
        if count := unread(first, last):
            gone.append((first, last, count))
    if state.older:
        gone.append((state.older_from, start - 1, state.older))
    repaired: list[int] = []
    orphaned: list[int] = []
    question: int | None = None  # the newest user message, and whether it was sent
    answered = False
    for item in (*state.pinned, *state.tail):
        position = item.position
        out = sent.get(position)
        if item.message.get("role") == "user" and position >= start and not item.pinned:
            question, answered = (None, False) if out is not None else (position, False)
        elif out is not None and question is not None and not item.pinned:
            answered = True
        if out is not None:
            if out.message is not item.message and "tool_calls" in item.message:
                repaired.append(position)
            overlap += lo <= position <= hi and not item.pinned
        elif lo <= position <= hi and not item.pinned:
            covered += 1
        elif position in dropped or (position <= end and not item.pinned):
            gone.append((position, position, 1))
        elif item.message.get("role") == "tool":
            orphaned.append(position)
        elif "tool_calls" in item.message:
            repaired.append(position)
    system = pinned = pinned_sent = 0
    for i in selection.items:
        if i is state.system:
            system += i.tokens
        elif i.pinned:
            pinned += i.tokens
            pinned_sent += 1
    summary = sum(each.tokens for each in selection.summaries) or (
        selection.summary.tokens if selection.summary is not None else 0
    )
    corrected = budget.correction.apply(total)
    limit = budget.limit
    return Report(
        strategy=strategy,
        system=system,
        pinned=pinned,
        summary=summary,
        messages=total - system - pinned - summary - recall - REPLY_PRIMING,
        priming=REPLY_PRIMING,
        tools=budget.tools,
        total=total,
        corrected=corrected,
        limit=limit,
        window=budget.window,
        reserve=budget.reserve,
        margin=budget.margin,
        cap=budget.cap,
        utilization=corrected / limit if limit > 0 else float("inf"),
        sent=len(messages),
        pinned_sent=pinned_sent,
        messages_sent=len(selection.items) - pinned_sent - (state.system is not None),
        dropped=sum(count for _, _, count in gone),
        first_dropped=gone[0][0] if gone else None,
        last_dropped=gone[-1][1] if gone else None,
        repaired=tuple(repaired),
        orphaned=tuple(orphaned),
        covered=covered,
        summary_omitted=state.summary is not None
        and selection.summary is None
        and not selection.summaries,
        overlap=overlap,
        partial_turn=question if answered else None,
        recall=recall,
        recalled=tuple(
            Retrieved(turn.start, turn.end, turn.score, turn.tokens) for turn in selection.recalled
        ),
    )


# --- for people -----------------------------------------------------------------------


def _messages(count: int) -> str:
    return f"{count} message" + ("" if count == 1 else "s")


def _positions(positions: Sequence[int]) -> str:
    shown = ", ".join(str(p) for p in positions[:10])
    return shown + (f" and {len(positions) - 10} more" if len(positions) > 10 else "")


def explain(context: Context) -> str:
    """A human-readable account of ``context.report``, one fact per line."""
    r = context.report
    limit = f"{r.window} - reserve {r.reserve}"
    if r.tools:
        limit += f" - tools {r.tools}"
    if r.margin:
        limit += f" - margin {r.margin}"
    if r.cap is not None:
        limit += f", capped at {r.cap}"
    lines = [
        f"strategy {r.strategy}: {r.total} of {r.limit} prompt tokens "
        f"({r.utilization:.1%}), {_messages(r.sent)}",
        f"  limit     {r.limit:>8}  (window {limit})",
        f"  system    {r.system:>8}",
        f"  pinned    {r.pinned:>8}  ({_messages(r.pinned_sent)})",
    ]
    if context.summary is not None:
        first, s = (context.summaries or (context.summary,))[0], context.summary
        parts = f", {len(context.summaries)} summaries" if len(context.summaries) > 1 else ""
        lines.append(f"  summary   {r.summary:>8}  (messages {first.start} to {s.end}{parts})")
    else:
        lines.append(f"  summary   {0:>8}" + ("  (left out: no room)" if r.summary_omitted else ""))
    if r.recalled:
        turns = f"{len(r.recalled)} earlier turn" + ("" if len(r.recalled) == 1 else "s")
        lines.append(f"  recall    {r.recall:>8}  ({turns})")
    lines += [
        f"  messages  {r.messages:>8}  ({_messages(r.messages_sent)})",
        f"  priming   {r.priming:>8}",
        f"  total     {r.total:>8}",
    ]
    if r.corrected != r.total:
        lines.append(f"  corrected {r.corrected:>8}  (calibrated against the server's counts)")
    if r.tools:
        lines.append(f"  tools     {r.tools:>8}  (taken off the window; prompt {r.prompt})")
    if r.dropped:
        where = f"positions {r.first_dropped} to {r.last_dropped}"
        lines.append(f"dropped the oldest {_messages(r.dropped)} ({where})")
    else:
        lines.append("dropped nothing")
    if r.covered:
        lines.append(f"{_messages(r.covered)} represented by the summary instead of sent")
    if r.overlap:
        lines.append(f"{_messages(r.overlap)} the summary represents also sent as they are")
    for turn in r.recalled:
        lines.append(
            f"recalled messages {turn.first} to {turn.last} (score {turn.score:.3g}, "
            f"{turn.tokens} tokens)"
        )
    if r.partial_turn is not None:
        lines.append(
            f"the newest turn (from position {r.partial_turn}) is larger than the budget: "
            "only its newest part is sent, without its question"
        )
    if r.repaired:
        lines.append(f"repaired unanswered tool calls at positions {_positions(r.repaired)}")
    if r.orphaned:
        lines.append(
            f"left out tool results without their call at positions {_positions(r.orphaned)}"
        )
    return "\n".join(lines)
