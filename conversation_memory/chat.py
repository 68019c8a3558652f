"""Turns with a model: send, stream, and bring-your-own-client prepare/record.

A turn is: the new message(s), the context built around them, one model
call, and one transaction storing the new messages, the reply and its usage
row together. Nothing is stored before the reply is in hand, so a failed call
leaves no half-written turn. After the turn, the server's reported prompt
tokens feed the calibration, and compaction runs when the strategy asks for
it (never while a transaction is open, never inside the model call).

Streaming stores the reply once, when the stream ends. A stream that ends
without a finish_reason, breaks, or is abandoned by the caller is stored as
incomplete (``on_incomplete="store"``, the default) or not at all
(``"drop"``); never as complete. A reply a content filter stopped
(finish_reason ``content_filter``) is incomplete too, streamed or not.

A reply the server stopped before its end (``finish_reason`` ``length``: the
``max_tokens`` or output limit; or ``content_filter``) is stored with
``{"finish_reason": ...}`` as its metadata, so the cut stays visible in
``entries()``, exports and ``convmem show``; one cut by ``length`` arrived
whole and is stored as complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conversation_memory.budget import Context, build
from conversation_memory.errors import BudgetExceeded, ConfigurationError, ContextLengthExceeded
from conversation_memory.store.values import NewMessage as Pending
from conversation_memory.store.values import UsageRecord
from conversation_memory.types import Correction

if TYPE_CHECKING:
    from conversation_memory.engine import Conversation

INCOMPLETE_CHOICES = ("store", "drop")
CUT_SHORT = frozenset({"length", "content_filter"})
"""Finish reasons of a reply the server stopped before the model was done."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A model's reply, as stored."""

    text: str
    message: dict[str, Any]
    """The assistant message as stored (content and tool_calls)."""
    finish_reason: str | None
    usage: Any
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


def incomplete_mode(mode: Any) -> str:
    """Check an ``on_incomplete`` setting."""
    if mode not in INCOMPLETE_CHOICES:
        raise ConfigurationError(
            f"on_incomplete must be one of {INCOMPLETE_CHOICES}, got {mode!r}",
            argument="on_incomplete",
        )
    return str(mode)


def turn_input(conversation: Conversation, new: Any) -> list[Pending]:
    """The new messages of a turn: text (a user message), one message, or several."""
    if new is None:
        return []
    if isinstance(new, str):
        return [conversation._pending({"role": "user", "content": new})]
    if isinstance(new, Mapping):
        return [conversation._pending(new)]
    if isinstance(new, Sequence):
        return [conversation._pending(message) for message in new]
    raise ConfigurationError(
        f"a turn takes text, a message dict or a list of messages, got {type(new).__name__}"
    )


def _reserve(params: Mapping[str, Any]) -> int | None:
    value = params.get("max_tokens", params.get("max_completion_tokens"))
    return value if isinstance(value, int) else None


TEMPLATE_ALLOWANCE = 256
"""Prompt tokens a server's chat template may add of its own: a default system prompt,
tool-use instructions (about 15 to 120 tokens in the Llama 3.1, Qwen 2.5 and SmolLM2
templates)."""


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


def turn_context(
    conversation: Conversation,
    pending: Sequence[Pending],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
    correction: Correction | None = None,
) -> tuple[Context, int]:
    """The context for this turn and our count of its prompt (tools included).

    ``correction`` replaces the stored one (the re-fit after a context-length
    error). Without it, a stored correction that leaves no room for what must be
    sent, yet claims more tokens than the request built with the model's initial
    correction could hold (:func:`prompt_ceiling`), is wrong (numbers from a
    server that was confused, or given to ``calibrate()`` by mistake); as nothing
    would be sent, no reply could ever correct it. So that request is built
    instead: if it is too long the server says so and the turn re-fits once from
    its numbers; if not, its reply's usage replaces the stored correction.
    """
    tool_tokens = conversation.counter.count_tools(tools) if tools else 0

    def built(correction: Correction | None) -> tuple[Context, int]:
        state, budget = conversation._read_state(
            tools=tool_tokens, extra=pending, reserve=_reserve(params), correction=correction
        )
        context = build(state, budget, conversation.strategy)
        return context, context.report.total + tool_tokens

    try:
        return built(correction)
    except BudgetExceeded as exc:
        stored, initial = conversation._known(), conversation._info.correction
        if correction is not None or (
            stored.factor <= initial.factor and stored.margin <= initial.margin
        ):
            raise
        refused = exc
    try:
        context, counted = built(initial)
    except BudgetExceeded:
        raise refused from None
    if stored.apply(counted) <= prompt_ceiling(context.messages, tools, counted):
        raise refused  # a plausible correction: the request is too long
    return context, counted


def _with_refit(
    conversation: Conversation,
    pending: Sequence[Pending],
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
    call: Any,
) -> tuple[Any, Context, int]:
    """Call the model; on a context-length error, re-fit from its numbers and retry once."""
    context, counted = turn_context(conversation, pending, tools=tools, params=params)
    try:
        return call(context), context, counted
    except ContextLengthExceeded as exc:
        correction = refit_correction(conversation, exc, context, counted, tools)
        if correction is None:
            raise
        context, counted = turn_context(
            conversation, pending, tools=tools, params=params, correction=correction
        )
        return call(context), context, counted


def refit_correction(
    conversation: Conversation,
    exc: ContextLengthExceeded,
    context: Context,
    counted: int,
    tools: Sequence[Mapping[str, Any]] | None,
) -> Correction | None:
    """The correction to re-fit with after ``exc``, or None if it says no size.

    The error's numbers are a claim about a request the server did not serve:
    they are capped at what the prompt could have been (:func:`prompt_ceiling`)
    and used for the one retry only, never stored. What is learnt for later
    comes from replies' usage, the exact count of a served prompt. So a bogus
    claim costs at most one smaller retry, and a retry that fails too leaves
    the stored correction as it was.
    """
    ceiling = prompt_ceiling(context.messages, tools, counted)
    reported = overflow_count(exc, counted, ceiling=ceiling)
    if reported is None:
        return None
    return Correction(*conversation._learn(counted, reported))


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


def _usage_row(completion: Any, counted: int, *, error: str | None = None) -> UsageRecord:
    usage = completion.usage
    return UsageRecord(
        kind="chat",
        model=completion.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        counted_prompt_tokens=counted,
        latency_ms=completion.latency_ms,
        finish_reason=completion.finish_reason,
        request_id=completion.request_id,
        error=error,
    )


def finish_turn(
    conversation: Conversation,
    pending: Sequence[Pending],
    completion: Any,
    counted: int | None,
    *,
    store_reply: bool = True,
    fold_wanted: bool = False,
) -> Reply:
    """Store the turn in one transaction, then calibrate and compact as needed."""
    batch = list(pending)
    if store_reply:
        cut = completion.finish_reason in CUT_SHORT
        batch.append(
            conversation._pending(
                completion.message,
                complete=completion.complete,
                metadata={"finish_reason": completion.finish_reason} if cut else None,
                check=False,
            )
        )
    if completion.complete:
        error = None
    elif completion.finish_reason == "content_filter":
        error = "the reply was stopped by the content filter"
    else:
        error = "the reply was cut off"
    reported = completion.usage.prompt_tokens
    observed = (counted, reported) if counted and reported and completion.usage.reported else None
    stored = conversation._commit(
        batch, usage=_usage_row(completion, counted or 0, error=error), observed=observed
    )
    conversation._after_turn(fold_wanted)
    return Reply(
        text=completion.text,
        message=dict(completion.message),
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        model=completion.model,
        position=stored[-1].position if store_reply and stored else None,
        complete=completion.complete,
        request_id=completion.request_id,
        latency_ms=completion.latency_ms,
    )


def send(
    conversation: Conversation,
    new: Any,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **params: Any,
) -> Reply:
    llm = conversation._memory.llm
    from conversation_memory.llm import check_params, check_tools

    checked = check_params(params, model=conversation.model)
    tool_list = check_tools(tools) if tools else None
    pending = turn_input(conversation, new)
    conversation._before_turn()

    def call(context: Context) -> Any:
        return llm.complete(
            model=conversation.model, messages=context.messages, tools=tool_list, **checked
        )

    completion, context, counted = _with_refit(
        conversation, pending, tools=tool_list, params=checked, call=call
    )
    return finish_turn(
        conversation, pending, completion, counted, fold_wanted=context.fold_through is not None
    )


class TurnStream:
    """The pieces of a streamed reply; the turn is stored once, when it ends.

    Iterate it for text pieces; use it as a context manager (or call
    ``close()``) to end it early. ``reply`` is set once it has ended.
    """

    def __init__(
        self,
        conversation: Conversation,
        pending: Sequence[Pending],
        inner: Any,
        counted: int,
        *,
        on_incomplete: str,
    ) -> None:
        self._conversation = conversation
        self._pending = pending
        self._inner = inner
        self._counted = counted
        self._on_incomplete = on_incomplete
        self._iterator: Iterator[str] = iter(inner)
        self.reply: Reply | None = None
        self._done = False
        self.fold_wanted = False
        """Whether the turn's context asked for compaction afterwards."""

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._iterator)
        except BaseException:
            self._finish()
            raise

    def close(self) -> None:
        if self._done:
            return
        try:
            self._inner.close()
        finally:
            self._finish()

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            with suppress(Exception):  # nobody to report to during garbage collection
                self.close()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        completion = self._inner.completion
        if completion is None:
            return  # the call failed before anything arrived: nothing to store
        if completion.complete or self._on_incomplete == "store":
            self.reply = finish_turn(
                self._conversation,
                self._pending,
                completion,
                self._counted,
                fold_wanted=self.fold_wanted,
            )
        else:
            self.reply = None


def stream(
    conversation: Conversation,
    new: Any,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    on_incomplete: str | None = None,
    **params: Any,
) -> TurnStream:
    llm = conversation._memory.llm
    from conversation_memory.llm import check_params, check_tools

    mode = incomplete_mode(on_incomplete or conversation._memory.on_incomplete)
    checked = check_params(params, model=conversation.model)
    tool_list = check_tools(tools) if tools else None
    pending = turn_input(conversation, new)
    conversation._before_turn()

    def call(context: Context) -> Any:
        inner = llm.stream(
            model=conversation.model, messages=context.messages, tools=tool_list, **checked
        )
        inner.start()  # connects (with retries) so a context-length error surfaces here
        return inner

    inner, context, counted = _with_refit(
        conversation, pending, tools=tool_list, params=checked, call=call
    )
    stream = TurnStream(conversation, pending, inner, counted, on_incomplete=mode)
    stream.fold_wanted = context.fold_through is not None
    return stream


@dataclass
class Prepared:
    """A turn prepared for the caller's own client, waiting for ``record``."""

    pending: list[Pending]
    context: Context
    counted: int


def prepare(
    conversation: Conversation,
    new: Any = None,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    pending = turn_input(conversation, new)
    params = {"max_tokens": max_tokens} if max_tokens is not None else {}
    context, counted = turn_context(conversation, pending, tools=tools, params=params)
    conversation._prepared = Prepared(pending=pending, context=context, counted=counted)
    return context.messages


def record(conversation: Conversation, reply: Any) -> Reply:
    from conversation_memory.llm import completion_from

    completion = completion_from(reply, model=conversation.model)
    prepared = conversation._prepared
    pending = prepared.pending if prepared is not None else []
    counted = prepared.counted if prepared is not None else None
    fold_wanted = prepared is not None and prepared.context.fold_through is not None
    result = finish_turn(conversation, pending, completion, counted, fold_wanted=fold_wanted)
    conversation._prepared = None
    return result
