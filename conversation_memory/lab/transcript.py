"""What the lab replays: a transcript (OpenAI-format messages), its sessions and its probes.

A transcript is one conversation as a flat list of messages. A conversation
held over several *sessions* (days apart, as people come back to a chat)
stays one list: each session starts at a message index and has a date, and
its first message opens with :func:`session_header` ("[Session 2 · Tuesday
14 May 2024]"), so that the date reaches the model the way any other text
does and a question such as "what did I do yesterday?" can be worked out.

A probe may name its *evidence*: the indexes of the messages that hold its
answer. That is what evidence retention (:mod:`~conversation_memory.lab.retention`)
looks for in the context sent when the probe is asked.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conversation_memory.lab.text import contains

__all__ = ["Probe", "Session", "Transcript", "session_header"]


@dataclass(frozen=True, slots=True)
class Probe:
    """A question asked part-way through a replay, with what a right answer contains.

    The question is sent with the context the strategy would send at that
    point; it is never stored, so later turns don't see it.
    """

    after: int
    """Asked once this many of the transcript's messages (system prompt excluded) are
    stored: at the first turn boundary at or after that point."""
    question: str
    expect: tuple[str, ...] = ()
    """Keywords or phrases that must all appear in the answer, as whole words, ignoring
    case and punctuation (:func:`~conversation_memory.lab.text.contains`)."""
    regex: str | None = None
    """A regular expression the answer must match (case-insensitive), besides ``expect``."""
    answer: str | None = None
    """The reference answer, for the LLM judge (default: the keywords)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Free-form details kept with the results (the generator stores the fact's age)."""
    evidence: tuple[int, ...] = ()
    """Indexes (into the transcript's ``messages``) of the messages that hold the answer,
    all said before the probe is asked; empty when unknown."""

    def reference(self) -> str:
        """The reference answer shown to a judge."""
        if self.answer:
            return self.answer
        return "; ".join(self.expect) if self.expect else f"text matching /{self.regex}/"

    def matches(self, answer: str) -> bool:
        """Keyword/regex scoring: every keyword appears and the regex (if any) matches."""
        if not all(contains(answer, keyword) for keyword in self.expect):
            return False
        return self.regex is None or re.search(self.regex, answer, re.IGNORECASE) is not None


@dataclass(frozen=True, slots=True)
class Transcript:
    """One conversation to replay.

    ``messages`` are OpenAI-format dicts in order, without the leading system
    prompt (that is ``system``). Each model request of the replay is the
    point just before an assistant message: a *turn*.
    """

    name: str
    messages: tuple[Mapping[str, Any], ...]
    system: str | None = None
    probes: tuple[Probe, ...] = ()
    tools: tuple[Mapping[str, Any], ...] | None = None
    """Tool definitions sent with every request (they count toward its tokens)."""
    source: str = ""
    """Where it was read from (``file.jsonl:3``), or how it was generated."""
    sessions: tuple[Session, ...] = ()
    """The sessions the messages were said in, in order (empty: one undated session)."""

    @property
    def turns(self) -> int:
        """Model requests a replay makes: assistant messages with something new before them."""
        return len(request_points(self.messages))


@dataclass(frozen=True, slots=True)
class Session:
    """Where one session of a transcript starts, and when it was held."""

    start: int
    """Index of its first message in the transcript's ``messages``."""
    date: dt.date | None = None
    number: int = 1
    """1 for the first session of the transcript."""


def session_header(number: int, date: dt.date | None) -> str:
    """The line a session's first message opens with: ``[Session 2 · Tuesday 14 May 2024]``."""
    if date is None:
        return f"[Session {number}]"
    return f"[Session {number} · {day_and_date(date)}]"


def day_and_date(date: dt.date) -> str:
    """``Tuesday 14 May 2024``, in English whatever the locale."""
    return f"{_DAYS[date.weekday()]} {date.day} {MONTHS[date.month - 1]} {date.year}"


MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def request_points(messages: Sequence[Mapping[str, Any]], *, live: bool = False) -> list[int]:
    """Indexes of the assistant messages that answer a request (the replay's *turns*).

    An assistant message right after another one (or at the very start) adds
    to the history without a request: nothing new was said to it. In live
    mode tool results are not replayed, so they make no request either.
    """
    ends: list[int] = []
    fresh = False
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            if fresh:
                ends.append(index)
            fresh = False
        elif role != "tool" or not live:
            fresh = True
    return ends
