"""A deterministic model for the lab that knows only what its request carries.

``conversation_memory.testing.ChatServer`` answers with canned text, which
would make recall meaningless. The lab gives it :func:`reply` instead
(:func:`lab_server` does), which plays three parts, none of them tuned to the
generator's phrasing:

- **Reader** (chat requests, e.g. a probe). It splits every message of the
  request except the last user message (the question) into sentences — the
  system prompt, any summary, the turns kept; abbreviations, decimals and URLs
  don't end one (:func:`~conversation_memory.lab.text.sentences`) — and
  answers with the sentence that shares the most content words with the
  question (ties: the newest), provided it shares at least half of them;
  otherwise "I don't know." So it can only answer from what the strategy kept
  in the context: a right answer means the context still held the fact. It
  does not know synonyms: a question asked in other words than its fact
  (``generate(paraphrase=True)``) finds nothing, which is why the lab's
  headline memory figure is evidence retention, not recall.
- **Summarizer** (requests carrying the summarizer prompt's transcript
  block). An extractive, size-capped summary that does what the summarizer
  prompt asks ("keep names, numbers, dates ...; drop small talk") as a rule
  of thumb: the previous summary's sentences, then from each new message the
  sentences that hold a number or a name (a capitalized word other than the
  first one and "I"; every sentence of a system message, i.e. of summaries
  being merged). Past 80% of ``max_tokens`` (by the server's own count) the
  oldest sentences go first; with nothing kept, the last message's first
  sentence stands in (a summary is never empty). Like any summary it keeps
  some facts and loses others: a fact with neither a number nor a name is
  dropped, and small caps push old facts out.
- **Judge** (requests with the lab's judge prompt). CORRECT when every
  content word of the reference answer appears in the answer.

Versions are recorded with results (:data:`VERSION`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from conversation_memory.lab.scoring import JUDGE_PROMPT
from conversation_memory.lab.text import content_words, sentences
from conversation_memory.testing import ChatServer, text_of

__all__ = ["VERSION", "answer", "extract_summary", "lab_server", "reply"]

VERSION = "reader-v2+extract-summary-v2+judge-v1"
"""Changes whenever any of the three parts would answer differently."""

UNKNOWN = "I don't know."

_BLOCK = re.compile(r"<(transcript-[\w-]*)>\n?(.*?)\n?</\1>", re.DOTALL)
_PREVIOUS = re.compile(r"^Previous summary:\n(.*?)\n\n", re.DOTALL)
_SPEAKER = re.compile(
    r"^(?:(user|assistant|system|developer)(?: \([^)]*\))?|tool result for [^:]*): ", re.MULTILINE
)
_NAME_WORD = re.compile(r"[^\W\d_][\w'\u2019-]*")
_PRONOUNS = frozenset({"I", "I'm", "I've", "I'll", "I'd", "I\u2019m", "I\u2019ve", "I\u2019ll"})


def reply(body: Mapping[str, Any]) -> str:
    """The lab model's reply to one chat request body (a ``ChatServer(reply=...)``)."""
    messages = [m for m in body.get("messages") or () if isinstance(m, Mapping)]
    system = text_of(messages[0].get("content")) if messages else ""
    last = text_of(messages[-1].get("content")) if messages else ""
    if system == JUDGE_PROMPT.system:
        return _judge(last)
    block = _BLOCK.search(last) if messages and messages[-1].get("role") == "user" else None
    if block is not None:
        previous = _PREVIOUS.search(last[: block.start()])
        before = previous.group(1) if previous else ""
        if before.strip() == "(none yet)":
            before = ""
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        return extract_summary(before, block.group(2), cap if isinstance(cap, int) else None)
    return answer(messages)


def answer(messages: Sequence[Mapping[str, Any]]) -> str:
    """The reader: the context's sentence that best matches the last user message."""
    question_at = max((n for n, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if question_at is None:
        return UNKNOWN
    wanted = content_words(text_of(messages[question_at].get("content")))
    if not wanted:
        return UNKNOWN
    best, best_score = None, 0
    for n, message in enumerate(messages):
        if n == question_at:
            continue
        for sentence in sentences(text_of(message.get("content"))):
            score = len(wanted & content_words(sentence))
            if score and score >= best_score:
                best, best_score = sentence, score
    if best is None or 2 * best_score < len(wanted):
        return UNKNOWN
    return best


def extract_summary(previous: str, transcript: str, max_tokens: int | None) -> str:
    """Previous summary + what each new message says with names or numbers, capped."""
    kept = sentences(previous)
    fallback: list[str] = []
    for speaker, text in _blocks(transcript):
        found = sentences(text)
        if speaker == "system":
            kept.extend(found)
        else:
            kept.extend(s for s in found if _informative(s))
        if not kept and found:
            fallback = found[:1]
    limit = None if max_tokens is None else max(1, int(max_tokens * 0.8))
    if limit is not None:
        while len(kept) > 1 and ChatServer.count_text(" ".join(kept)) > limit:
            kept.pop(0)
    summary = " ".join(kept or fallback) or "Nothing to note."
    if limit is not None and ChatServer.count_text(summary) > limit:
        summary = summary.encode("utf-8")[: limit * 3].decode("utf-8", errors="ignore")
    return summary


def lab_server(**options: Any) -> ChatServer:
    """A ``ChatServer`` answering with :func:`reply` (not started; use it in ``with``)."""
    options.setdefault("window", 1_000_000)
    return ChatServer(reply=reply, **options)


def _judge(request: str) -> str:
    fields = dict(re.findall(r"^(Reference answer|Answer to grade): (.*)$", request, re.MULTILINE))
    reference = content_words(fields.get("Reference answer", ""))
    given = content_words(fields.get("Answer to grade", ""))
    return "CORRECT" if reference and reference <= given else "INCORRECT"


def _blocks(transcript: str) -> list[tuple[str, str]]:
    """(speaker, text) of each message in a rendered transcript."""
    starts = list(_SPEAKER.finditer(transcript))
    out = []
    for n, match in enumerate(starts):
        end = starts[n + 1].start() if n + 1 < len(starts) else len(transcript)
        out.append((match.group(1) or "tool", transcript[match.end() : end].strip()))
    return out


def _informative(sentence: str) -> bool:
    """Holds a number, or a name: a capitalized word after the first, other than I."""
    if any(ch.isdigit() for ch in sentence):
        return True
    words = _NAME_WORD.findall(sentence)[1:]
    return any(w[0].isupper() and w not in _PRONOUNS for w in words)
