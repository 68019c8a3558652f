"""Evidence retention: did the messages that answer a probe reach the model?

Recall, as the lab measures it, depends on a reader: a probe counts only if
the model answers it right. Evidence retention does not. A probe may name
its *evidence* (:attr:`~conversation_memory.lab.transcript.Probe.evidence`),
the transcript messages that hold its answer; when the probe is asked, each
evidence message is **retained** if the context sent at that moment carries
it in one of three ways:

- ``raw``: the message itself was sent (its stored position is among the
  items of ``Conversation.prepared``);
- ``retrieved``: it was sent inside the recall message, which brings earlier
  turns back into the context (the ``recall`` strategies) and lists their
  positions in the context's report (read by :func:`_retrieved_positions`);
- ``summary``: a summary that was sent covers it, and the probe's answer
  keywords (or its regex) appear in that summary's text — the summary kept
  what the question needs, not only the gist.

Otherwise it is lost. A run's retention is the share of all its probes'
evidence messages that were retained. It needs no model, so it measures the
memory alone, with any backend.

Everything the lab learns from a context goes through :func:`sent_in`: the
one place that turns ``Conversation.prepared`` into the positions and
summaries present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from conversation_memory.lab.transcript import Probe

__all__ = ["WAYS", "Sent", "retained", "sent_in", "tally", "whole_history"]

WAYS = ("raw", "retrieved", "summary")
"""How an evidence message can be present in a context, in the order they are tried."""


@dataclass(frozen=True, slots=True)
class Sent:
    """What one request carried, by stored position (0 is the first message after the
    system prompt)."""

    raw: frozenset[int]
    """Positions of the stored messages sent as they are."""
    retrieved: frozenset[int] = frozenset()
    """Positions of earlier messages sent inside a retrieval message."""
    summaries: tuple[tuple[int, int, str], ...] = ()
    """(first, last position covered, text) of each summary sent."""


def sent_in(context: Any) -> Sent:
    """What ``context`` (a ``Conversation.prepared``) carries: the lab's only reading of it."""
    summaries = tuple(context.summaries) or (
        (context.summary,) if context.summary is not None else ()
    )
    return Sent(
        raw=frozenset(item.position for item in context.items if item.position >= 0),
        retrieved=_retrieved_positions(context),
        summaries=tuple((s.start, s.end, s.text) for s in summaries),
    )


def _retrieved_positions(context: Any) -> frozenset[int]:
    """Positions sent inside the recall message: a ``recall`` strategy sends earlier
    turns in one delimited message and its report lists them (``Report.recalled``)."""
    return frozenset(context.report.retrieved)


def whole_history(count: int) -> Sent:
    """The full-history baseline's context: every message said so far, as it is."""
    return Sent(raw=frozenset(range(count)))


def retained(
    probe: Probe, sent: Sent, position_of: Callable[[int], int | None]
) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """How each of ``probe``'s evidence messages was present in ``sent``.

    ``position_of`` maps a transcript index to where the replay stored that
    message as it was written (None: it was not, e.g. a reply regenerated in
    live mode, and it is left out: neither retained nor lost). Returns the
    evidence indexes measured and, for each, a way of :data:`WAYS` or None
    (lost).
    """
    indexes: list[int] = []
    ways: list[str | None] = []
    for index in probe.evidence:
        position = position_of(index)
        if position is None:
            continue
        indexes.append(index)
        ways.append(_way(probe, sent, position))
    return tuple(indexes), tuple(ways)


def _way(probe: Probe, sent: Sent, position: int) -> str | None:
    if position in sent.raw:
        return "raw"
    if position in sent.retrieved:
        return "retrieved"
    for first, last, text in sent.summaries:
        if first <= position <= last and probe.matches(text):
            return "summary"
    return None


def tally(ways: Iterable[str | None]) -> Mapping[str, int]:
    """How many evidence messages were retained each way, and lost."""
    counts = dict.fromkeys((*WAYS, "lost"), 0)
    for way in ways:
        counts[way or "lost"] += 1
    return counts
