"""What the lab replays: a transcript (OpenAI-format messages) and its probe questions."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Probe", "Transcript"]


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
    """Keywords or phrases that must all appear in the answer (case-insensitive, whole words)."""
    regex: str | None = None
    """A regular expression the answer must match (case-insensitive), besides ``expect``."""
    answer: str | None = None
    """The reference answer, for the LLM judge (default: the keywords)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Free-form details kept with the results (the generator stores the fact's age)."""

    def reference(self) -> str:
        """The reference answer shown to a judge."""
        if self.answer:
            return self.answer
        return "; ".join(self.expect) if self.expect else f"text matching /{self.regex}/"

    def matches(self, answer: str) -> bool:
        """Keyword/regex scoring: every keyword appears and the regex (if any) matches."""
        for keyword in self.expect:
            pattern = r"(?<!\w)" + re.escape(keyword.strip()) + r"(?!\w)"
            if not re.search(pattern, answer, re.IGNORECASE):
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

    @property
    def turns(self) -> int:
        """Model requests a replay makes: assistant messages with something new before them."""
        return len(request_points(self.messages))


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
