"""Compaction: folding old messages into new summary rows, written once as steps.

The strategy says how far to fold (``Selection.fold_through``); :func:`compact`
does it, as a flow of the conversation log, the strategy, the token counter
and the summarizer (see ``steps``; the drivers are ``Conversation`` and
``AsyncConversation``):

1. take the conversation's compaction lease (one compaction per conversation
   at a time; ``store.leases`` says how a short lease, renewed while the
   summarizer works, survives holders that die);
2. read the state and the strategy's fold point, then the messages after the
   current summary up to it, in chunks that fit the summarizer's input;
3. for each chunk, ask the summarizer (a :class:`~steps.Summarize` step, run
   outside any transaction) with the previous summary and the chunk, check
   the text (``summarize.check_summary``), and store it as a new summary row
   with its usage row in one transaction that succeeds only if the summary it
   was built on is still the newest one;
4. for hierarchical summaries, merge every run of ``fanout`` summaries of one
   level into one a level up, the same way;
5. drop the lease.

Messages are never touched. A failure stores nothing but a usage row with the
error; the next turn tries again.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from conversation_memory.state import Setup, read_state
from conversation_memory.steps import Flow, Summarize, SummaryLog, UseLog
from conversation_memory.store.values import Entry, NewSummary, UsageRecord
from conversation_memory.summarize import SummaryText, check_summary
from conversation_memory.types import Budget, Message, Summary

if TYPE_CHECKING:
    from conversation_memory.store.leases import Lease

DEFAULT_SUMMARY_CAP = 1024
PROMPT_ALLOWANCE = 400
"""Tokens kept for the summarizer's instructions and framing around the transcript."""
RUNNING = "another compaction of this conversation is running"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one compaction did."""

    summaries: tuple[Summary, ...] = ()
    skipped: str | None = None
    """Why nothing was done (no fold needed, another compaction running)."""
    error: str | None = None
    """Why it stopped: the summarizer failed or its summary was refused."""


def compact(setup: Setup, *, chunk_tokens: int | None = None) -> Flow[Outcome]:
    """Fold what the strategy asks for into summaries; see the module docstring.

    ``chunk_tokens`` caps the transcript of one summarizer call below what
    fits the summarizer's window.
    """

    def take(log: SummaryLog) -> Lease | str:
        if not log.stored:
            return "nothing to fold"  # not stored yet: no row to fold, nor to lease
        return log.take_lease(0) or RUNNING

    # The lease comes first: a compaction that read the state before another
    # finished would otherwise summarize the same range again.
    lease = yield UseLog(take)
    if isinstance(lease, str):
        return Outcome(skipped=lease)
    try:
        outcome = yield from _fold(setup, chunk_tokens)
    except GeneratorExit:
        lease.stop()  # abandoned by its driver: no more I/O, the lease lapses by itself
        raise
    except BaseException:
        yield _drop(lease)
        raise
    yield _drop(lease)
    return outcome


def _drop(lease: Lease) -> UseLog[SummaryLog, None]:
    return UseLog(lambda log: log.drop_lease(lease))


def _fold(setup: Setup, chunk_tokens: int | None) -> Flow[Outcome]:
    strategy, counter = setup.strategy, setup.counter
    reading = yield from read_state(setup)
    try:
        fold = strategy.select(reading.state, reading.budget).fold_through
    except BudgetExceeded:
        # The newest turn alone is over the budget (a long reply): there is
        # nothing to decide here; the next request's own check reports it.
        return Outcome(skipped="the newest turn alone is over the budget")
    if fold is None:
        return Outcome(skipped="nothing to fold")
    previous = reading.state.summary
    cap, chunk_tokens = _sizes(setup, reading.budget, previous, chunk_tokens)
    first = previous.end + 1 if previous is not None else 0
    start = previous.start if previous is not None else 0
    hierarchical = setup.hierarchical
    done: list[Summary] = []
    entries: list[Entry] = yield UseLog(lambda log: log.entries(first, fold))
    for chunk_start, last, chunk in _chunks(entries, first, fold, chunk_tokens=chunk_tokens):
        if hierarchical:
            start = chunk_start  # each level-0 summary stands for its own period
        before = None if hierarchical or previous is None else previous.text
        said = [*chunk, {"role": "system", "content": before}] if before else chunk
        try:
            result: SummaryText = yield Summarize(before, chunk, max_tokens=cap)
            text = check_summary(result.text, max_tokens=cap, count=counter.count_text, source=said)
        except (SummarizationFailed, ModelError) as exc:
            yield _failed(setup, exc)
            return Outcome(summaries=tuple(done), error=str(exc))
        stored = yield _store(setup, previous, start=start, end=last, text=text, result=result)
        if stored is None:
            return Outcome(summaries=tuple(done), skipped="another compaction won")
        done.append(stored)
        previous = stored
        if hierarchical:
            error = yield from _merge(setup, cap, done)
            if error is not None:
                return Outcome(summaries=tuple(done), error=error)
    return Outcome(summaries=tuple(done))


def _merge(setup: Setup, cap: int, done: list[Summary]) -> Flow[str | None]:
    """Merge every run of ``fanout`` same-level summaries in the cover, bottom up."""
    fanout = setup.strategy.fanout  # type: ignore[attr-defined]
    while True:
        cover: list[Summary] = yield UseLog(lambda log: log.summary_cover())
        run = _first_full_run(cover, fanout)
        if run is None:
            return None
        texts = [{"role": "system", "content": each.text} for each in run]
        try:
            result: SummaryText = yield Summarize(None, texts, max_tokens=cap)
            text = check_summary(
                result.text, max_tokens=cap, count=setup.counter.count_text, source=texts
            )
        except (SummarizationFailed, ModelError) as exc:
            yield _failed(setup, exc)
            return str(exc)
        level = run[0].level + 1
        stored = yield _store(
            setup,
            run[-1],
            start=run[0].start,
            end=run[-1].end,
            text=text,
            result=result,
            level=level,
        )
        if stored is None:
            return None  # merged by a concurrent compaction
        done.append(stored)


def _store(
    setup: Setup,
    previous: Summary | None,
    *,
    start: int,
    end: int,
    text: str,
    result: SummaryText,
    level: int = 0,
) -> UseLog[SummaryLog, Summary | None]:
    """Store the summary if ``previous`` is still the newest (level 0); None if another won."""
    rendered = summary_message(Summary(start=start, end=end, text=text, tokens=0, level=level))
    new = NewSummary(
        start=start,
        end=end,
        text=text,
        tokens=setup.counter.count_message(rendered),
        strategy=setup.strategy.name,
        model=result.model,
        prompt_version=result.prompt_version,
        level=level,
        based_on=previous.id if previous is not None else None,
        usage=UsageRecord(
            kind="summary",
            model=result.model,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_ms=result.latency_ms,
            request_id=result.request_id,
        ),
    )
    return UseLog(lambda log: log.store_summary(new))


def _failed(setup: Setup, exc: Exception) -> UseLog[SummaryLog, None]:
    failure = UsageRecord(kind="summary", model=setup.summarizer_model, error=str(exc))
    return UseLog(lambda log: log.record_usage(failure))


def _first_full_run(cover: list[Summary], fanout: int) -> list[Summary] | None:
    """The oldest ``fanout`` consecutive summaries of one level in ``cover``, if any."""
    for i in range(len(cover) - fanout + 1):
        run = cover[i : i + fanout]
        if all(each.level == run[0].level for each in run):
            return run
    return None


def _chunks(
    entries: Sequence[Entry], first: int, last: int, *, chunk_tokens: int
) -> list[tuple[int, int, list[Message]]]:
    """(first, last, messages) pieces of positions ``first..last``, each under ``chunk_tokens``."""
    pieces: list[tuple[int, int, list[Message]]] = []
    current: list[Message] = []
    start = first
    tokens = 0
    for entry in entries:
        if current and tokens + entry.tokens > chunk_tokens:
            pieces.append((start, entry.position - 1, current))
            current, tokens, start = [], 0, entry.position
        current.append(entry.message)
        tokens += entry.tokens
    if current:
        pieces.append((start, last, current))
    return pieces


def _sizes(
    setup: Setup, budget: Budget, previous: Summary | None, chunk_tokens: int | None
) -> tuple[int, int]:
    """The summary cap and the transcript size per summarizer call.

    Both fit the summarizer model: the cap is at most its output limit, and a
    chunk plus the previous summary, the instructions and the cap fit its
    window (so a backlog after an outage or an import is summarized in
    pieces instead of failing forever).
    """
    cap_of: Any = getattr(setup.strategy, "summary_cap", None)
    cap = cap_of(budget) if callable(cap_of) else min(DEFAULT_SUMMARY_CAP, budget.limit // 4)
    try:
        info = get_model(setup.summarizer_model)
        window, max_output = info.window, info.max_output
    except ConfigurationError:
        window, max_output = budget.window, cap  # a model we don't know: the chat's window
    cap = max(16, min(cap, max_output))
    room = window - cap - PROMPT_ALLOWANCE - (previous.tokens if previous else 0)
    room = int(room / max(budget.correction.factor, 1.0))
    fitted = max(64, room)
    return cap, fitted if chunk_tokens is None else min(chunk_tokens, fitted)


__all__ = ["Outcome", "compact"]
