"""Summarizers for tests: deterministic, recording, and scriptable to fail."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from conversation_memory.errors import SummarizationFailed
from conversation_memory.summarize import SummaryText, render_transcript
from conversation_memory.types import Message


@dataclass
class SummaryCall:
    """One call to a :class:`RecordingSummarizer`."""

    previous: str | None
    messages: list[Message]
    max_tokens: int


@dataclass
class RecordingSummarizer:
    """Summarizes without a model and records every call.

    The summary keeps the previous one and adds the first words of each new
    message, so tests can check what reached it. ``fail_next(n)`` makes the
    next ``n`` calls raise; ``replies`` (if given) are returned in order
    instead, e.g. to feed an empty or refusing summary.
    """

    words_per_message: int = 6
    model: str = "recording-summarizer"
    prompt_version: str = "recording-v1"
    replies: list[str] = field(default_factory=list)
    calls: list[SummaryCall] = field(default_factory=list)
    _failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail_next(self, times: int = 1) -> None:
        with self._lock:
            self._failures += times

    def recover(self) -> None:
        """Stop failing (cancel what ``fail_next`` queued)."""
        with self._lock:
            self._failures = 0

    def summarize(
        self, previous: str | None, messages: Sequence[Message], *, max_tokens: int
    ) -> SummaryText:
        with self._lock:
            self.calls.append(SummaryCall(previous, list(messages), max_tokens))
            if self._failures:
                self._failures -= 1
                raise SummarizationFailed("scripted summarizer failure")
            scripted = self.replies.pop(0) if self.replies else None
        if scripted is not None:
            return SummaryText(text=scripted, model=self.model, prompt_version=self.prompt_version)
        lines = []
        for line in render_transcript(messages).splitlines():
            words = line.split()
            if words:
                lines.append(" ".join(words[: self.words_per_message]))
        text = " | ".join(filter(None, [previous or "", *lines]))
        words = text.split()
        budget = max(1, int(max_tokens * 0.5))  # words, well under the token cap
        if len(words) > budget:
            text = " ".join(words[-budget:])
        return SummaryText(text=text, model=self.model, prompt_version=self.prompt_version)
