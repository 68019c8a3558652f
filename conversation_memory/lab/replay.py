"""One strategy at one budget, replayed through the engine (see :mod:`.runner`).

Each transcript is a conversation of its own in ``Memory(db)``: for each
turn ``Conversation.prepare`` gives the exact request the strategy would
send, which is counted, and ``Conversation.record`` stores the reply (the
transcript's own in replay mode, the model's in live mode); compaction runs
after it whenever the request asked for a fold. Probes are asked with the
context ``prepare(question)`` gives, and never stored; what that context
carries of the probe's evidence is read from ``Conversation.prepared``
(:func:`~conversation_memory.lab.retention.sent_in`), with each transcript
message found at the position the replay stored it. Summaries are made
through a :class:`Meter`, which notes what each one cost. With the lab's
embeddings, what each step stored is embedded right after it, in this thread
(``Embeddings(background=False)`` and ``embed_pending``), so that a recalling
strategy's next request finds it by meaning and the results stay deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conversation_memory import (
    ContextLengthExceeded,
    Conversation,
    ConversationMemoryError,
    Memory,
    ModelInfo,
    ModelSummarizer,
    Strategy,
    SummaryText,
    TokenCounter,
    UnknownModel,
    budget_for,
    count_tokens,
    get_model,
)
from conversation_memory.lab.measure import Lab, Message, Tally, score
from conversation_memory.lab.results import BASELINE, RunResult
from conversation_memory.lab.retention import retained, sent_in
from conversation_memory.lab.transcript import Probe, Transcript

__all__ = ["LAB_USER", "Meter", "run_strategy"]

LAB_USER = "lab"
"""The user the replayed conversations belong to (visible with ``convmem sessions``
when ``db`` keeps them)."""


class Meter:
    """A :class:`ModelSummarizer` that notes the tokens and cost of each of its calls."""

    def __init__(self, inner: ModelSummarizer, counter: TokenCounter) -> None:
        self.inner = inner
        self.model = inner.model
        self.counter = counter
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        try:
            self._info: ModelInfo | None = get_model(inner.model)
        except UnknownModel:
            self._info = None
        self._cost: float | None = 0.0

    def summarize(
        self, previous: str | None, messages: Sequence[Message], *, max_tokens: int
    ) -> SummaryText:
        request = self.inner.messages(previous, messages, max_tokens=max_tokens)
        prompt = count_tokens(request, counter=self.counter)
        self.calls += 1
        self.prompt_tokens += prompt
        completion = 0
        try:
            result = self.inner.summarize(previous, messages, max_tokens=max_tokens)
            completion = self.counter.count_text(result.text)
            self.completion_tokens += completion
            return result
        finally:
            price = self._info.cost(prompt, completion) if self._info is not None else None
            self._cost = None if self._cost is None or price is None else self._cost + price

    def take_cost(self) -> float | None:
        """What the calls since the last take cost (None: no price for the model)."""
        cost, self._cost = self._cost, 0.0
        return cost


def run_strategy(
    lab: Lab,
    db: str | Path,
    transcripts: Sequence[Transcript],
    strategy: Strategy,
    budget: int | None,
    *,
    label: str,
) -> RunResult:
    meter = Meter(ModelSummarizer(lab.llm, model=lab.summary_model), lab.counter)
    tally = Tally()
    limit = budget_for(lab.model, cap=budget).limit
    with Memory(
        db, model=lab.model, summarizer=meter, compaction="after", embeddings=lab.embeddings
    ) as memory:
        for transcript in transcripts:
            conversation = memory.conversation(
                user=LAB_USER,
                system=transcript.system,
                strategy=strategy,
                budget=budget,
                title=f"lab {label}: {transcript.name}"[:200],
            )
            limit = conversation.budget().limit
            try:
                _replay(
                    lab, conversation, meter=meter, transcript=transcript, tally=tally, label=label
                )
            except ConversationMemoryError as exc:
                tally.error = f"{transcript.name}, turn {tally.turn}: {exc}"
            finally:
                for call in conversation.calls():
                    if call.kind == "summary" and call.error is not None:
                        tally.failures += 1
                        if call.error not in tally.errors and len(tally.errors) < 5:
                            tally.errors.append(call.error)
            if tally.error is not None:
                break
    return RunResult(
        strategy=BASELINE if label == BASELINE else strategy.name,
        budget=budget,
        limit=limit,
        tokens=tuple(tally.tokens),
        costs=tuple(tally.costs),
        summary_calls=meter.calls,
        summary_failures=tally.failures,
        summary_prompt_tokens=meter.prompt_tokens,
        summary_completion_tokens=meter.completion_tokens,
        summary_errors=tuple(tally.errors),
        probes=tuple(tally.probes),
        probes_skipped=tally.skipped,
        error=tally.error,
    )


def _replay(
    lab: Lab,
    conversation: Conversation,
    *,
    meter: Meter,
    transcript: Transcript,
    tally: Tally,
    label: str,
) -> None:
    requests = set(lab.requests(transcript.messages))
    probes = sorted(transcript.probes, key=lambda p: p.after)
    tools = transcript.tools if lab.mode == "replay" else None
    pending: list[dict[str, Any]] = []
    waiting: list[int] = []  # the transcript indexes of ``pending``
    stored: dict[int, int] = {}  # transcript index -> position, for messages stored as written
    turn = tally.turn = 0
    for index, message in enumerate(transcript.messages):
        role = message.get("role")
        if role != "assistant":
            if lab.mode == "replay" or role != "tool":
                pending.append(dict(message))
                waiting.append(index)
            continue
        if index in requests:
            turn = tally.turn = turn + 1
            sent = conversation.prepare(pending, tools=tools)
            tokens = _prompt_tokens(conversation)
            if lab.mode == "replay":
                reply: Any = dict(message)
                completion = lab.reply_tokens_of(message)
            else:
                reply, sent, tokens = _live_call(lab, conversation, pending, sent, tokens)
                completion = lab.reply_tokens_of(reply["choices"][0]["message"])
            position = conversation.record(reply).position
            _embed(lab, conversation)
            if position is not None:
                first = position - len(pending) - 1
                stored.update((each, first + n) for n, each in enumerate(waiting, start=1))
                if lab.mode == "replay":
                    stored[index] = position
            pending, waiting = [], []
            price = lab.cost(tokens, completion)
            summaries = meter.take_cost()
            tally.tokens.append(tokens)
            tally.costs.append(None if price is None or summaries is None else price + summaries)
            lab.tick(label)
        elif lab.mode == "replay":
            # Nothing new was said to it: no request.
            stored[index] = conversation.append(dict(message)).position
            _embed(lab, conversation)
        if lab.mode == "live" or not message.get("tool_calls"):
            while probes and probes[0].after <= index + 1:
                _ask(
                    lab,
                    conversation,
                    probe=probes.pop(0),
                    transcript=transcript,
                    turn=turn,
                    tally=tally,
                    stored=stored,
                )
    if pending:
        for each, message_stored in zip(waiting, conversation.extend(pending), strict=True):
            stored[each] = message_stored.position
        _embed(lab, conversation)
    for probe in probes:
        _ask(
            lab,
            conversation,
            probe=probe,
            transcript=transcript,
            turn=turn,
            tally=tally,
            stored=stored,
        )


def _embed(lab: Lab, conversation: Conversation) -> None:
    """Embed what was just stored, with the lab's embeddings (if any)."""
    if lab.embeddings is not None:
        conversation.embed_pending()


def _prompt_tokens(conversation: Conversation) -> int:
    """The prompt tokens of what ``prepare`` just returned, as the budget counted them
    (each message's count stored at write time; tool definitions included)."""
    prepared = conversation.prepared
    assert prepared is not None
    return prepared.report.prompt


def _live_call(
    lab: Lab,
    conversation: Conversation,
    pending: list[dict[str, Any]],
    sent: list[dict[str, Any]],
    tokens: int,
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Ask the model for this turn's reply; on a context-length error, calibrate and retry once."""

    def call(messages: list[dict[str, Any]]) -> Any:
        return lab.llm.complete(
            model=lab.model, messages=messages, max_tokens=lab.reply_tokens, temperature=0
        )

    try:
        completion = call(sent)
    except ContextLengthExceeded as exc:
        requested = getattr(exc, "requested", None)
        if not isinstance(requested, int) or requested <= tokens:
            raise
        conversation.calibrate(counted=tokens, reported=requested)
        sent = conversation.prepare(pending)
        tokens = _prompt_tokens(conversation)
        completion = call(sent)
    usage = completion.usage
    body = {
        "model": completion.model,
        "choices": [{"message": completion.message, "finish_reason": completion.finish_reason}],
        "usage": (
            {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            if usage.reported
            else None
        ),
    }
    return body, sent, tokens


def _ask(
    lab: Lab,
    conversation: Conversation,
    *,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: Tally,
    stored: dict[int, int],
) -> None:
    """Ask one probe with the context ``prepare(question)`` gives; score and note it, with
    what that context carried of its evidence."""
    sent = conversation.prepare(probe.question, max_tokens=lab.probe_tokens)
    context = conversation.prepared
    assert context is not None
    evidence = retained(probe, sent_in(context), stored.get)
    score(
        lab,
        sent,
        tokens=_prompt_tokens(conversation),
        probe=probe,
        transcript=transcript,
        turn=turn,
        tally=tally,
        evidence=evidence,
    )
