"""Compaction: folding old messages into a new summary row, safely under concurrency.

The strategy says how far to fold (``Selection.fold_through``); this module
does it:

1. take the conversation's compaction lease (one compaction per conversation
   at a time; see "Leases" below);
2. read the messages after the current summary up to the fold point, in
   chunks that fit the summarizer's input;
3. for each chunk, call the summarizer with the previous summary and the
   chunk, outside any transaction, check the text, and store it as a new
   summary row in one transaction, which also records its usage and only
   succeeds if the summary it was built on is still the newest one;
4. drop the lease.

Messages are never touched. A failure stores nothing but a usage row with the
error; the next turn tries again.

Leases. A lease is a row that lasts ``LEASE_SECONDS`` (a few seconds), and
its holder renews it from a background thread every third of that for as
long as it compacts, through the long summarizer call included. A holder
that dies (kill -9, a power cut, a lost host) stops renewing, so its lease
lapses within seconds and the next compaction takes over; with a lease sized
for the slowest summarizer call, a crash loop would never get a summary made.
We chose a short renewed lease over checking whether the holder's pid is
alive: a pid means nothing on another host, or in another container, and
PostgreSQL serves many of both; the lease needs only the database and clocks
that agree to within a second or two. The lease only saves work. Should it
lapse under a live holder (a renewal stalled past ``LEASE_SECONDS``, a skewed
clock), two compactions may call the summarizer for one range, but only one
summary is stored: step 3 takes the conversation row's lock and stores a
summary only if the one it was built on is still the newest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory.budget import summary_message
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    ModelError,
    SummarizationFailed,
)
from conversation_memory.registry import get_model
from conversation_memory.store.values import NewSummary, UsageRecord
from conversation_memory.summarize import Summarizer, SummaryText, check_summary
from conversation_memory.types import Summary

if TYPE_CHECKING:
    from conversation_memory.engine import Conversation

DEFAULT_SUMMARY_CAP = 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one compaction did."""

    summaries: tuple[Summary, ...] = ()
    skipped: str | None = None
    """Why nothing was done (no fold needed, another compaction running)."""
    error: str | None = None
    """Why it stopped: the summarizer failed or its summary was refused."""


@contextmanager
def _leased(conversation: Conversation, level: int) -> Iterator[bool]:
    """Hold the lease for the block (renewed meanwhile); False if another holds it."""
    log = conversation.log
    lease = log.take_lease(level)
    if lease is None:
        yield False
        return
    try:
        yield True
    finally:
        log.drop_lease(lease)


def _chunks(
    conversation: Conversation, first: int, last: int, *, chunk_tokens: int
) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """(first, last, messages) pieces of positions ``first..last``, each under ``chunk_tokens``."""
    pieces: list[tuple[int, int, list[dict[str, Any]]]] = []
    current: list[dict[str, Any]] = []
    start = first
    tokens = 0
    for entry in conversation.log.entries(first, last):
        if current and tokens + entry.tokens > chunk_tokens:
            pieces.append((start, entry.position - 1, current))
            current, tokens, start = [], 0, entry.position
        current.append(entry.message)
        tokens += entry.tokens
    if current:
        pieces.append((start, last, current))
    return pieces


def _store_summary(
    conversation: Conversation,
    *,
    previous: Summary | None,
    start: int,
    end: int,
    text: str,
    tokens: int,
    strategy: str,
    result: SummaryText,
    level: int = 0,
) -> Summary | None:
    """Insert the summary if ``previous`` is still the newest; None if another won."""
    return conversation.log.store_summary(
        NewSummary(
            start=start,
            end=end,
            text=text,
            tokens=tokens,
            strategy=strategy,
            model=result.model,
            prompt_version=result.prompt_version,
            level=level,
            based_on=previous.id if previous else None,
            usage=UsageRecord(
                kind="summary",
                model=result.model,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                latency_ms=result.latency_ms,
                request_id=result.request_id,
            ),
        )
    )


def record_failure(conversation: Conversation, model: str, error: str) -> None:
    conversation.log.record_usage(UsageRecord(kind="summary", model=model, error=error))


def _merge(
    conversation: Conversation,
    summarizer: Summarizer,
    summarizer_model: str,
    cap: int,
    done: list[Summary],
) -> str | None:
    """Merge every run of ``fanout`` same-level summaries in the cover, bottom up."""
    fanout = conversation.strategy.fanout  # type: ignore[attr-defined]
    counter = conversation.counter
    while True:
        cover = conversation.summary_cover()
        run = _first_full_run(cover, fanout)
        if run is None:
            return None
        texts = [{"role": "system", "content": each.text} for each in run]
        try:
            result = summarizer.summarize(None, texts, max_tokens=cap)
            text = check_summary(
                result.text, max_tokens=cap, count=counter.count_text, source=texts
            )
        except (SummarizationFailed, ModelError) as exc:
            record_failure(conversation, summarizer_model, str(exc))
            return str(exc)
        level = run[0].level + 1
        rendered = summary_message(
            Summary(start=run[0].start, end=run[-1].end, text=text, tokens=0, level=level)
        )
        stored = _store_summary(
            conversation,
            previous=run[-1],
            start=run[0].start,
            end=run[-1].end,
            text=text,
            tokens=counter.count_message(rendered),
            strategy=conversation.strategy.name,
            result=result,
            level=level,
        )
        if stored is None:
            return None  # merged by a concurrent compaction
        done.append(stored)


def _first_full_run(cover: list[Summary], fanout: int) -> list[Summary] | None:
    """The oldest ``fanout`` consecutive summaries of one level in ``cover``, if any."""
    for i in range(len(cover) - fanout + 1):
        run = cover[i : i + fanout]
        if all(each.level == run[0].level for each in run):
            return run
    return None


PROMPT_ALLOWANCE = 400
"""Tokens kept for the summarizer's instructions and framing around the transcript."""


def _sizes(
    strategy: Any,
    budget: Any,
    summarizer_model: str,
    previous: Summary | None,
    chunk_tokens: int | None,
) -> tuple[int, int]:
    """The summary cap and the transcript size per summarizer call.

    Both fit the summarizer model: the cap is at most its output limit, and a
    chunk plus the previous summary, the instructions and the cap fit its
    window (so a backlog after an outage or an import is summarized in
    pieces instead of failing forever).
    """
    cap_of = getattr(strategy, "summary_cap", None)
    cap = cap_of(budget) if callable(cap_of) else min(DEFAULT_SUMMARY_CAP, budget.limit // 4)
    try:
        info = get_model(summarizer_model)
        window, max_output = info.window, info.max_output
    except ConfigurationError:
        window, max_output = budget.window, cap  # a model we don't know: the chat's window
    cap = max(16, min(cap, max_output))
    room = window - cap - PROMPT_ALLOWANCE - (previous.tokens if previous else 0)
    room = int(room / max(budget.correction.factor, 1.0))
    fitted = max(64, room)
    return cap, fitted if chunk_tokens is None else min(chunk_tokens, fitted)


def compact(
    conversation: Conversation,
    summarizer: Summarizer,
    *,
    summarizer_model: str,
    chunk_tokens: int | None = None,
) -> Outcome:
    """Fold what the strategy asks for into summaries; see the module docstring."""
    if not len(conversation):
        return Outcome(skipped="nothing to fold")  # not stored yet (the lease needs the row)
    strategy = conversation.strategy
    # The lease comes first: a compaction that read the state before another
    # finished would otherwise summarize the same range again.
    with _leased(conversation, 0) as held:
        if not held:
            return Outcome(skipped="another compaction of this conversation is running")
        done: list[Summary] = []
        hierarchical = bool(getattr(strategy, "hierarchical", False))
        state, budget = conversation.read_state()
        try:
            fold = strategy.select(state, budget).fold_through
        except BudgetExceeded:
            # The newest turn alone is over the budget (a long reply): there is
            # nothing to decide here; the next request's own check reports it.
            return Outcome(skipped="the newest turn alone is over the budget")
        if fold is None:
            return Outcome(skipped="nothing to fold")
        cap, chunk_tokens = _sizes(strategy, budget, summarizer_model, state.summary, chunk_tokens)
        previous = state.summary
        first = previous.end + 1 if previous is not None else 0
        start = previous.start if previous is not None else 0
        counter = conversation.counter
        for chunk_start, last, chunk in _chunks(
            conversation, first, fold, chunk_tokens=chunk_tokens
        ):
            if hierarchical:
                start = chunk_start  # each level-0 summary stands for its own period
            try:
                before = None if hierarchical or previous is None else previous.text
                result = summarizer.summarize(before, chunk, max_tokens=cap)
                said = [*chunk, {"role": "system", "content": before}] if before else chunk
                text = check_summary(
                    result.text, max_tokens=cap, count=counter.count_text, source=said
                )
            except (SummarizationFailed, ModelError) as exc:
                record_failure(conversation, summarizer_model, str(exc))
                return Outcome(summaries=tuple(done), error=str(exc))
            rendered = summary_message(Summary(start=start, end=last, text=text, tokens=0))
            stored = _store_summary(
                conversation,
                previous=previous,
                start=start,
                end=last,
                text=text,
                tokens=counter.count_message(rendered),
                strategy=strategy.name,
                result=result,
            )
            if stored is None:
                return Outcome(summaries=tuple(done), skipped="another compaction won")
            done.append(stored)
            previous = stored
            if hierarchical:
                error = _merge(conversation, summarizer, summarizer_model, cap, done)
                if error is not None:
                    return Outcome(summaries=tuple(done), error=error)
    return Outcome(summaries=tuple(done))


__all__ = ["Outcome", "compact"]
