"""What one conversation's turns are built from: its setup and its state (no I/O).

:class:`Setup` is everything fixed about a conversation while it is open:
its model and token counter, its strategy, its budget settings, and how
compaction runs. It checks and counts new messages (before any transaction:
the write lock is then held for a few short statements) and works out
budgets. :func:`read_state` is the flow of one snapshot read: it asks the
conversation log for the head, summary, tail and pinned messages in one
transaction, and turns them into the :class:`~conversation_memory.types.State`
a strategy selects from. Both the turn (``turns``) and compaction
(``compaction``) build on these two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from conversation_memory import calibration
from conversation_memory.budget import budget_for
from conversation_memory.errors import BudgetExceeded, ConfigurationError
from conversation_memory.messages import check_metadata, normalize, to_row
from conversation_memory.registry import ModelInfo, get_model
from conversation_memory.retrieval import costed
from conversation_memory.steps import Flow, SnapshotLog, UseLog
from conversation_memory.store.values import Head, NewMessage, Snapshot
from conversation_memory.strategies import Strategy
from conversation_memory.tokens import REPLY_PRIMING, TokenCounter, counter_for
from conversation_memory.types import Budget, Correction, Item, RecallQuery, State

COMPACTION_CHOICES = ("after", "before", "manual")
"""When to fold old turns into summaries: after each reply (off the response
path), before each request (so the request already carries the new summary),
or only when ``compact()`` is called."""


@dataclass(frozen=True, slots=True)
class Setup:
    """A conversation's model, counter, strategy and budget settings while it is open."""

    conversation_id: str
    model: str
    info: ModelInfo
    counter: TokenCounter
    strategy: Strategy
    cap: int | None
    """The caller's cap on prompt tokens (``budget=``)."""
    reserve: int | None
    """The reply reserve (``reserve=``; None: the model's default)."""
    system_tokens: int
    summarizer_model: str
    """The model its summaries are recorded as made by."""
    compaction: str = "after"
    on_incomplete: str = "store"
    limit: int = 0
    """The plain prompt budget (no tools, no calibration) every new message is checked
    against; set by :meth:`of`."""
    embeddings_model: str | None = None
    """The memory's embeddings model (None: it has none, recall goes by words)."""
    min_similarity: float = 0.0
    """How similar to the question a message must be for its vector to recall it."""

    @classmethod
    def of(
        cls,
        *,
        conversation_id: str,
        model: str,
        strategy: Strategy,
        cap: int | None,
        reserve: int | None,
        system_tokens: int,
        summarizer_model: str,
        compaction: str = "after",
        on_incomplete: str = "store",
        embeddings_model: str | None = None,
        min_similarity: float = 0.0,
    ) -> Setup:
        """A setup, checked now: a budget that can't work fails here, not at the first turn."""
        setup = cls(
            conversation_id=conversation_id,
            model=model,
            info=get_model(model),
            counter=counter_for(model),
            strategy=strategy,
            cap=cap,
            reserve=reserve,
            system_tokens=system_tokens,
            summarizer_model=summarizer_model,
            compaction=compaction,
            on_incomplete=on_incomplete,
            embeddings_model=embeddings_model,
            min_similarity=min_similarity,
        )
        return replace(setup, limit=setup.budget().limit)

    @property
    def hierarchical(self) -> bool:
        return bool(getattr(self.strategy, "hierarchical", False))

    def budget(
        self, *, tools: int = 0, correction: Correction | None = None, reserve: int | None = None
    ) -> Budget:
        """The prompt budget for a request (``reserve``: its max_tokens)."""
        result = replace(
            budget_for(
                self.model,
                reserve=reserve if reserve is not None else self.reserve,
                tools=tools,
                cap=self.cap,
            ),
            correction=correction or Correction(),
        )
        if result.limit <= REPLY_PRIMING:
            raise ConfigurationError(
                f"the prompt budget is {result.limit} tokens (window {result.window}, reply "
                f"reserve {result.reserve}, tools {tools}, cap {self.cap}); lower the "
                "reserve or raise the budget",
                conversation_id=self.conversation_id,
            )
        return result

    def known(self, stored: Correction | None) -> Correction:
        """The correction in force: what was stored, else the model's initial one."""
        return calibration.known(stored, self.info.correction)

    def message(
        self,
        message: Mapping[str, Any],
        *,
        pinned: bool = False,
        metadata: Mapping[str, Any] | None = None,
        complete: bool = True,
        check: bool = True,
    ) -> NewMessage:
        """Check and count a message before any transaction starts.

        ``check=False`` skips the size check: a model's reply is stored
        whatever its size (it was already paid for).
        """
        normalized = normalize(message)
        meta = check_metadata(metadata)
        tokens = self.counter.count_message(normalized)
        limit = self.limit
        if check and tokens + REPLY_PRIMING + self.system_tokens > limit:
            raise BudgetExceeded(
                f"this message alone is {tokens} tokens; with the system prompt "
                f"({self.system_tokens}) it cannot fit the prompt budget of {limit} "
                "tokens. Split it, shorten it, or raise the budget.",
                conversation_id=self.conversation_id,
                tokens=tokens,
                limit=limit,
            )
        row = to_row(normalized)
        row["tokens"] = tokens
        row["meta"] = meta
        return NewMessage(message=normalized, row=row, pinned=pinned, complete=complete)

    def turn_input(self, new: Any) -> list[NewMessage]:
        """The new messages of a turn: text (a user message), one message, or several."""
        if new is None:
            return []
        if isinstance(new, str):
            return [self.message({"role": "user", "content": new})]
        if isinstance(new, Mapping):
            return [self.message(new)]
        if isinstance(new, Sequence):
            return [self.message(message) for message in new]
        raise ConfigurationError(
            f"a turn takes text, a message dict or a list of messages, got {type(new).__name__}"
        )


@dataclass(frozen=True, slots=True)
class Reading:
    """A state read for a request, with the budget it was read for."""

    state: State
    budget: Budget
    known: Correction
    """The correction in force when it was read (stored, else the model's initial one)."""


class _Plan:
    """How far back the tail must reach, decided from the head inside the read."""

    def __init__(
        self, setup: Setup, tools: int, reserve: int | None, correction: Correction | None
    ) -> None:
        self.setup, self.tools, self.reserve, self.correction = setup, tools, reserve, correction
        self.budget: Budget | None = None
        self.known = Correction()

    def __call__(self, head: Head) -> int:
        self.known = self.setup.known(head.correction)
        chosen = self.correction or self.known
        self.budget = self.setup.budget(tools=self.tools, correction=chosen, reserve=self.reserve)
        return int(self.budget.limit / max(chosen.factor, 1e-9)) + 1


def read_state(
    setup: Setup,
    *,
    tools: int = 0,
    extra: Sequence[NewMessage] = (),
    reserve: int | None = None,
    correction: Correction | None = None,
    recall: bool = False,
    vector: bytes | None = None,
) -> Flow[Reading]:
    """One snapshot read: head and calibration, summary, pinned and a bounded tail.

    ``extra`` are messages of the turn in progress, not stored yet: they join
    the tail at the positions they would get. ``correction`` budgets this
    request instead of the stored one (which is still what a reply calibrates).
    With ``recall``, a strategy that recalls (``recall_query``) gets the earlier
    turns its query finds, searched in the same snapshot (``State.recalled``);
    ``vector`` (the new question embedded) finds them by meaning too.
    """
    plan = _Plan(setup, tools, reserve, correction)
    cover = setup.hierarchical
    overlap = bool(getattr(setup.strategy, "overlap", False))
    asks: Any = getattr(setup.strategy, "recall_query", None) if recall else None

    def query(snapshot: Snapshot) -> RecallQuery | None:
        assert plan.budget is not None
        found: RecallQuery | None = asks(state_of(snapshot, extra), plan.budget)
        if found is None or vector is None or setup.embeddings_model is None:
            return found
        return replace(
            found, vector=vector, model=setup.embeddings_model, min_similarity=setup.min_similarity
        )

    def read(log: SnapshotLog) -> Snapshot:
        return log.read(plan, cover=cover, overlap=overlap, recall=query if asks else None)

    snapshot: Snapshot = yield UseLog(read)
    assert plan.budget is not None
    return Reading(state_of(snapshot, extra, setup=setup), plan.budget, plan.known)


def state_of(
    snapshot: Snapshot, extra: Sequence[NewMessage] = (), *, setup: Setup | None = None
) -> State:
    """The strategy's view of a snapshot, with the turn's unsaved messages at its end.

    Recalled turns are counted with ``setup``'s counter (without one, none are kept).
    """
    head, summary, tail, pinned = snapshot.head, snapshot.summary, snapshot.tail, snapshot.pinned
    after = summary.end if summary is not None else -1
    start = tail[0].position if tail else head.next_position
    if extra:
        tail = [
            *tail,
            *(
                Item(
                    position=head.next_position + n,
                    message=pending.message,
                    tokens=pending.tokens,
                    pinned=pending.pinned,
                )
                for n, pending in enumerate(extra)
            ),
        ]
    system = None
    if head.system is not None:
        system = Item(
            position=-1,
            message={"role": "system", "content": head.system},
            tokens=head.system_tokens,
        )
    gap_pinned = [item.position for item in pinned if item.position > after]
    older_from = after + 1
    for position in gap_pinned:  # sorted: skip pinned ones at the very start
        if position == older_from:
            older_from += 1
    recalled, overhead = (), 0
    if snapshot.recalled and setup is not None and tail:
        counter = setup.counter
        of = tail[-1].position + 1
        recalled, overhead = costed(
            snapshot.recalled, of, counter.count_text, counter.count_message
        )
    return State(
        system=system,
        pinned=pinned,
        summary=summary,
        tail=tail,
        has_older=snapshot.has_older,
        older=max(0, start - (after + 1) - len(gap_pinned)),
        older_from=older_from,
        summaries=tuple(snapshot.cover),
        recalled=recalled,
        recall_overhead=overhead,
    )


__all__ = ["COMPACTION_CHOICES", "Reading", "Setup", "read_state", "state_of"]
