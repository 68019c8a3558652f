"""What every run of the lab measures with: its settings, its tally, scoring a probe.

A run is one strategy at one budget, replayed through the engine
(:mod:`~conversation_memory.lab.replay`), or the full-history baseline
(:mod:`~conversation_memory.lab.baseline`). Both count prompt tokens with the
model's counter, price them with the registry's list prices, and ask and
score probes the same way: keywords/regex or an LLM judge
(:mod:`~conversation_memory.lab.scoring`), and, for probes that name their
evidence, which of it the context carried
(:mod:`~conversation_memory.lab.retention`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conversation_memory import Embeddings, ModelInfo, TokenCounter, count_tokens
from conversation_memory.errors import ModelError
from conversation_memory.lab.results import ProbeResult
from conversation_memory.lab.scoring import judge_messages, judge_verdict
from conversation_memory.lab.transcript import Probe, Transcript, request_points

if TYPE_CHECKING:
    from conversation_memory.llm import LLM

__all__ = ["Lab", "Message", "Progress", "Tally", "score"]

Message = Mapping[str, Any]
"""A chat message as the lab reads it."""

Progress = Callable[[int, int, str], None]
"""Called after every turn with (steps done, steps in all, label of the run)."""


@dataclass
class Lab:
    """Settings shared by every run of one lab."""

    llm: LLM
    model: str
    info: ModelInfo
    counter: TokenCounter
    summary_model: str
    judge_model: str
    scoring: str
    mode: str
    probe_tokens: int
    reply_tokens: int
    progress: Progress | None
    total: int
    done: int = 0
    embeddings: Embeddings | None = None
    """How the replayed memories embed their messages (recall by meaning), embedding
    each stored turn before the next request; None: recall by words."""

    def tick(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)

    def requests(self, messages: Sequence[Message]) -> list[int]:
        """Where the turns of ``messages`` are, in this lab's mode (see ``request_points``)."""
        return request_points(messages, live=self.mode == "live")

    def count(self, messages: Sequence[Message], tools: Any = None) -> int:
        return count_tokens(messages, tools=tools, counter=self.counter)

    def reply_tokens_of(self, message: Message) -> int:
        """Completion tokens of a reply: its text and its tool calls' JSON."""
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        if isinstance(content, list):
            text = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        tokens = self.counter.count_text(text) if text else 0
        if message.get("tool_calls"):
            tokens += self.counter.count_text(json.dumps(message["tool_calls"]))
        return tokens

    def cost(self, prompt: int, completion: int) -> float | None:
        return self.info.cost(prompt, completion)


@dataclass
class Tally:
    """What one run has measured so far."""

    tokens: list[int | None] = field(default_factory=list)
    costs: list[float | None] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    skipped: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    error: str | None = None
    turn: int = 0
    """The turn being replayed (of the current transcript)."""


def score(
    lab: Lab,
    sent: list[dict[str, Any]],
    *,
    tokens: int,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: Tally,
    evidence: tuple[tuple[int, ...], tuple[str | None, ...]] = ((), ()),
) -> None:
    """Send ``sent`` (a probe's question in its context), score the answer, note it with
    ``evidence``: the probe's evidence indexes measured and how each was retained
    (:func:`~conversation_memory.lab.retention.retained`)."""
    error = None
    try:
        answer = lab.llm.complete(
            model=lab.model, messages=sent, max_tokens=lab.probe_tokens, temperature=0
        ).text
        if lab.scoring == "judge":
            verdict = lab.llm.complete(
                model=lab.judge_model,
                messages=judge_messages(probe, answer),
                max_tokens=8,
                temperature=0,
            ).text
            correct = judge_verdict(verdict)
        else:
            correct = probe.matches(answer)
    except ModelError as exc:
        answer, correct, error = "", False, str(exc)
    tally.probes.append(
        ProbeResult(
            transcript=transcript.name,
            turn=turn,
            question=probe.question,
            expected=probe.reference(),
            answer=answer,
            correct=correct,
            tokens=tokens,
            meta=dict(probe.meta),
            error=error,
            evidence=evidence[0],
            retained=evidence[1],
        )
    )
