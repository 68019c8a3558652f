"""One turn with a model, written once as steps: send, stream, prepare/record.

A turn is: the new message(s), the context built around them, one model
call, and one transaction storing the new messages, the reply and its usage
row together. Nothing is stored before the reply is in hand, so a failed call
leaves no half-written turn. Each function here is a flow (see ``steps``):
it yields the snapshot read, the model call and the commit to its driver,
``Conversation`` or ``AsyncConversation``, and decides everything else:

1. the new message(s), checked and counted (``Setup.turn_input``);
2. compaction first, with ``compaction="before"`` (:func:`before_turn`);
3. the context (:func:`context`): for a recalling strategy with the
   memory's embeddings, the new question embedded first (:func:`embed_question`;
   if that fails, recall goes by words); one snapshot read, the strategy's
   selection, the validated messages and their token report;
4. the model call; on a context-length error, once: the correction its
   numbers imply (never stored), a re-fitted context, the call again
   (:func:`call`);
5. the turn stored in one transaction, with the calibration its reply's
   usage teaches (:func:`finish`);
6. compaction after the reply, when the context asked for a fold
   (:func:`after_turn`); a failing one never fails the stored turn.

Streaming stores the reply once, when the stream ends (:func:`end_stream`).
A stream that ends without a finish_reason, breaks, or is abandoned by the
caller is stored as incomplete (``on_incomplete="store"``, the default) or
not at all (``"drop"``); never as complete. A reply a content filter stopped
(finish_reason ``content_filter``) is incomplete too, streamed or not.

A reply the server stopped before its end (``finish_reason`` ``length``: the
``max_tokens`` or output limit; or ``content_filter``) is stored with
``{"finish_reason": ...}`` as its metadata, so the cut stays visible in
``entries()``, exports and ``convmem show``; one cut by ``length`` arrived
whole and is stored as complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory import calibration, compaction, recall
from conversation_memory.budget import Context
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    ContextLengthExceeded,
    ConversationMemoryError,
)
from conversation_memory.fitting import build
from conversation_memory.state import Setup, read_state
from conversation_memory.steps import CallModel, Embed, Flow, SummaryLog, TurnLog, UseLog
from conversation_memory.store.values import Committed, NewMessage, UsageRecord
from conversation_memory.strategies import Summarizing
from conversation_memory.types import Correction

if TYPE_CHECKING:
    from conversation_memory.llm import Completion, Usage

INCOMPLETE_CHOICES = ("store", "drop")
CUT_SHORT = frozenset({"length", "content_filter"})
"""Finish reasons of a reply the server stopped before the model was done."""
TEMPLATE_ALLOWANCE = 256
"""Prompt tokens a server's chat template may add of its own: a default system prompt,
tool-use instructions (about 15 to 120 tokens in the Llama 3.1, Qwen 2.5 and SmolLM2
templates)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A model's reply, as stored."""

    text: str
    message: dict[str, Any]
    """The assistant message as stored (content and tool_calls)."""
    finish_reason: str | None
    usage: Usage
    """Prompt and completion tokens (``usage.reported`` False when we counted)."""
    model: str
    position: int | None
    """Where the reply was stored (None when it was not)."""
    complete: bool
    request_id: str | None = None
    latency_ms: float | None = None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.message.get("tool_calls") or [])


@dataclass(frozen=True, slots=True)
class Built:
    """A context built for a request, with our count of its prompt (tools included)."""

    context: Context
    counted: int
    known: Correction
    """The correction in force when it was read (what a context-length error's
    numbers are learnt from)."""
    vector: bytes | None = None
    """The new question embedded for recall (None: not embedded); a re-fit reuses it."""


@dataclass(frozen=True, slots=True)
class Called:
    """A turn whose model call is made: its new messages, context, and the call's result
    (a ``Completion``, or a started stream)."""

    pending: list[NewMessage]
    built: Built
    result: Any

    @property
    def fold_wanted(self) -> bool:
        """Whether the turn's context asked for compaction afterwards."""
        return self.built.context.fold_through is not None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A turn prepared for the caller's own client, waiting for ``record``."""

    pending: list[NewMessage]
    context: Context
    counted: int


def incomplete_mode(mode: Any) -> str:
    """Check an ``on_incomplete`` setting."""
    if mode not in INCOMPLETE_CHOICES:
        raise ConfigurationError(
            f"on_incomplete must be one of {INCOMPLETE_CHOICES}, got {mode!r}",
            argument="on_incomplete",
        )
    return str(mode)


def checked(
    setup: Setup, params: Mapping[str, Any], tools: Sequence[Mapping[str, Any]] | None
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The call's parameters and tools, checked before anything is read or sent."""
    from conversation_memory.llm import check_params, check_tools

    return check_params(params, model=setup.model), check_tools(tools) if tools else None


def _reserve(params: Mapping[str, Any]) -> int | None:
    value = params.get("max_tokens", params.get("max_completion_tokens"))
    return value if isinstance(value, int) else None


def prompt_ceiling(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, counted: int
) -> int:
    """The most prompt tokens any server could count for this request (our count ``counted``).

    No tokenizer makes more tokens of a text than its UTF-8 bytes, and the
    request's JSON holds every byte a template renders, its keys and quotes
    standing for the per-message framing. Our own count is added for what is
    not text (an image's tokens), and :data:`TEMPLATE_ALLOWANCE` for the
    template's own words.
    """
    payload = json.dumps([messages, tools or []], ensure_ascii=False, separators=(",", ":"))
    return len(payload.encode("utf-8")) + counted + TEMPLATE_ALLOWANCE


def embed_question(setup: Setup, pending: Sequence[NewMessage]) -> Flow[bytes | None]:
    """The new question embedded, when the strategy recalls and the memory has
    embeddings; None otherwise, and when the endpoint fails (recall goes by words).

    It runs before the snapshot read: a network call never runs inside a
    transaction. The text is the query's words (``recall.vector_text``).
    """
    if setup.embeddings_model is None or not hasattr(setup.strategy, "recall_query"):
        return None
    text = recall.vector_text([each.message for each in pending])
    if not text:
        return None
    try:
        vector: bytes = yield Embed(text)
    except Exception:  # the endpoint down or its answer malformed: never the turn's failure
        return None
    return vector


def context(
    setup: Setup,
    pending: Sequence[NewMessage],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    reserve: int | None = None,
    correction: Correction | None = None,
    vector: bytes | None = None,
) -> Flow[Built]:
    """The context for this turn and our count of its prompt (tools included).

    ``correction`` replaces the stored one (the re-fit after a context-length
    error). Without it, a stored correction that leaves no room for what must be
    sent, yet claims more tokens than the request built with the model's initial
    correction could hold (:func:`prompt_ceiling`), is wrong (numbers from a
    server that was confused, or given to ``calibrate()`` by mistake); as nothing
    would be sent, no reply could ever correct it. So that request is built
    instead: if it is too long the server says so and the turn re-fits once from
    its numbers; if not, its reply's usage replaces the stored correction.
    ``vector`` is the question already embedded (a re-fit's); else it is embedded now.
    """
    tool_tokens = setup.counter.count_tools(tools) if tools else 0
    if vector is None:
        vector = yield from embed_question(setup, pending)
    reading = yield from read_state(
        setup,
        tools=tool_tokens,
        extra=pending,
        reserve=reserve,
        correction=correction,
        recall=True,
        vector=vector,
    )
    stored, initial = reading.known, setup.info.correction
    try:
        made = build(reading.state, reading.budget, setup.strategy)
    except BudgetExceeded as exc:
        if correction is not None or (
            stored.factor <= initial.factor and stored.margin <= initial.margin
        ):
            raise
        refused = exc
    else:
        return Built(made, made.report.total + tool_tokens, stored, vector)
    reading = yield from read_state(
        setup,
        tools=tool_tokens,
        extra=pending,
        reserve=reserve,
        correction=initial,
        recall=True,
        vector=vector,
    )
    try:
        made = build(reading.state, reading.budget, setup.strategy)
    except BudgetExceeded:
        raise refused from None
    counted = made.report.total + tool_tokens
    if stored.apply(counted) <= prompt_ceiling(made.messages, tools, counted):
        raise refused  # a plausible correction: the request is too long
    return Built(made, counted, stored, vector)


def refit_correction(
    built: Built, exc: ContextLengthExceeded, tools: Sequence[Mapping[str, Any]] | None
) -> Correction | None:
    """The correction to re-fit with after ``exc``, or None if it says no size.

    The error's numbers are a claim about a request the server did not serve:
    they are capped at what the prompt could have been (:func:`prompt_ceiling`)
    and used for the one retry only, never stored. What is learnt for later
    comes from replies' usage, the exact count of a served prompt. So a bogus
    claim costs at most one smaller retry, and a retry that fails too leaves
    the stored correction as it was.
    """
    ceiling = prompt_ceiling(built.context.messages, tools, built.counted)
    reported = overflow_count(exc, built.counted, ceiling=ceiling)
    if reported is None:
        return None
    return calibration.learnt(built.known, built.counted, reported)


def overflow_count(
    exc: ContextLengthExceeded, counted: int, *, ceiling: int | None = None
) -> int | None:
    """The prompt size the server says it counted for our ``counted`` (at most
    ``ceiling``), or None if unknown."""
    requested = getattr(exc, "requested", None)
    limit = getattr(exc, "limit", None)
    if not requested and limit:
        # Only the limit is known: assume we undercount by what overflowed.
        requested = max(counted + 1, int(counted * 1.1))
    if not requested:
        return None
    requested = max(int(requested), 1)
    return requested if ceiling is None else min(requested, ceiling)


def call(
    setup: Setup,
    pending: list[NewMessage],
    *,
    tools: list[dict[str, Any]] | None,
    params: Mapping[str, Any],
    stream: bool = False,
) -> Flow[Called]:
    """Build the context and call the model; on a context-length error, re-fit from its
    numbers and call once more."""
    reserve = _reserve(params)
    built = yield from context(setup, pending, tools=tools, reserve=reserve)
    request = CallModel(setup.model, built.context.messages, tools, params, stream=stream)
    try:
        result = yield request
    except ContextLengthExceeded as exc:
        correction = refit_correction(built, exc, tools)
        if correction is None:
            raise
        built = yield from context(
            setup, pending, tools=tools, reserve=reserve, correction=correction, vector=built.vector
        )
        request = CallModel(setup.model, built.context.messages, tools, params, stream=stream)
        result = yield request
    return Called(pending, built, result)


def finish(
    setup: Setup,
    pending: Sequence[NewMessage],
    completion: Completion,
    counted: int | None,
    *,
    fold_wanted: bool = False,
) -> Flow[Reply]:
    """Store the turn in one transaction (with what its usage teaches the calibration),
    then compact if the context asked for it."""
    cut = completion.finish_reason in CUT_SHORT
    answer = setup.message(
        completion.message,
        complete=completion.complete,
        metadata={"finish_reason": completion.finish_reason} if cut else None,
        check=False,
    )
    batch = [*pending, answer]
    if completion.complete:
        error = None
    elif completion.finish_reason == "content_filter":
        error = "the reply was stopped by the content filter"
    else:
        error = "the reply was cut off"
    usage = completion.usage
    learn = None
    if counted and usage.prompt_tokens and usage.reported:
        learn = calibration.from_reply(setup.info.correction, counted, usage.prompt_tokens)
    record = UsageRecord(
        kind="chat",
        model=completion.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        counted_prompt_tokens=counted or 0,
        latency_ms=completion.latency_ms,
        finish_reason=completion.finish_reason,
        request_id=completion.request_id,
        error=error,
    )

    def commit(log: TurnLog) -> Committed:
        return log.commit(batch, usage=record, learn=learn)

    committed: Committed = yield UseLog(commit)
    yield from after_turn(setup, fold_wanted)
    return Reply(
        text=completion.text,
        message=dict(completion.message),
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        model=completion.model,
        position=committed.stored[-1].position if committed.stored else None,
        complete=completion.complete,
        request_id=completion.request_id,
        latency_ms=completion.latency_ms,
    )


def send(
    setup: Setup, new: Any, *, tools: list[dict[str, Any]] | None, params: Mapping[str, Any]
) -> Flow[Reply]:
    """A whole turn: ``params`` and ``tools`` as :func:`checked` returned them."""
    pending = setup.turn_input(new)
    yield from before_turn(setup)
    called = yield from call(setup, pending, tools=tools, params=params)
    return (
        yield from finish(
            setup, pending, called.result, called.built.counted, fold_wanted=called.fold_wanted
        )
    )


def start_stream(
    setup: Setup, new: Any, *, tools: list[dict[str, Any]] | None, params: Mapping[str, Any]
) -> Flow[Called]:
    """A streamed turn up to its started stream (see :func:`end_stream`)."""
    pending = setup.turn_input(new)
    yield from before_turn(setup)
    return (yield from call(setup, pending, tools=tools, params=params, stream=True))


def end_stream(setup: Setup, called: Called, *, on_incomplete: str) -> Flow[Reply | None]:
    """Store a stream's turn once it ended: whole, incomplete, or not at all."""
    completion = called.result.completion
    if completion is None:
        return None  # the call failed before anything arrived: nothing to store
    if not completion.complete and on_incomplete != "store":
        return None
    return (
        yield from finish(
            setup,
            called.pending,
            completion,
            called.built.counted,
            fold_wanted=called.fold_wanted,
        )
    )


def prepare(
    setup: Setup,
    new: Any,
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    max_tokens: int | None,
) -> Flow[Prepared]:
    """The exact messages to send with the caller's own client (nothing stored yet)."""
    pending = setup.turn_input(new)
    built = yield from context(setup, pending, tools=tools, reserve=max_tokens)
    return Prepared(pending, built.context, built.counted)


def record(setup: Setup, prepared: Prepared | None, reply: Any) -> Flow[Reply]:
    """Store the reply to ``prepared`` (a ChatCompletion, its dict, or text)."""
    from conversation_memory.llm import completion_from

    completion = completion_from(reply, model=setup.model)
    pending = prepared.pending if prepared is not None else []
    counted = prepared.counted if prepared is not None else None
    fold_wanted = prepared is not None and prepared.context.fold_through is not None
    return (yield from finish(setup, pending, completion, counted, fold_wanted=fold_wanted))


# -- when compaction runs around a turn ---------------------------------------------------


def before_turn(setup: Setup) -> Flow[None]:
    """Compact before building a request (``compaction="before"``)."""
    if setup.compaction == "before" and isinstance(setup.strategy, Summarizing):
        yield from compact_quietly(setup)


def after_turn(setup: Setup, fold_wanted: bool) -> Flow[None]:
    """Compact after a turn whose context asked for a fold (``compaction="after"``)."""
    if fold_wanted and setup.compaction == "after" and isinstance(setup.strategy, Summarizing):
        yield from compact_quietly(setup)


def compact_quietly(setup: Setup) -> Flow[None]:
    """Compaction around a turn never fails the turn: errors become usage rows."""
    try:
        yield from compaction.compact(setup)
    except ConversationMemoryError as exc:  # e.g. no client to summarize with
        failure = UsageRecord(kind="summary", model=setup.summarizer_model, error=str(exc))

        def record_failure(log: SummaryLog) -> None:
            log.record_usage(failure)

        with suppress(ConversationMemoryError):
            yield UseLog(record_failure)


__all__ = [
    "CUT_SHORT",
    "INCOMPLETE_CHOICES",
    "Built",
    "Called",
    "Prepared",
    "Reply",
    "after_turn",
    "before_turn",
    "call",
    "checked",
    "compact_quietly",
    "context",
    "end_stream",
    "finish",
    "incomplete_mode",
    "overflow_count",
    "prepare",
    "prompt_ceiling",
    "record",
    "refit_correction",
    "send",
    "start_stream",
]
