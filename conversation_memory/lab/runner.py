"""Replaying transcripts through strategies × budgets, and measuring each run.

Each strategy × budget replays every transcript in a conversation of its own,
through the public engine: for each *turn* (the point before an assistant
message), ``Conversation.prepare(new messages)`` gives the exact request the
strategy would send, which is counted, and ``Conversation.record(reply)``
stores the turn; compaction runs after it whenever that request asked for a
fold, exactly as in a chatbot. In **replay** mode the reply is the
transcript's own, so only memory differs between runs and the model is
called only to summarize and to answer probes; in **live** mode the
transcript's user messages are sent and the model's replies stored instead
(assistant and tool messages of the transcript are skipped; tool definitions
are not sent).

At each probe point the probe's question is prepared the same way and sent
to the model, but never stored. The answer is scored by keywords/regex or by
an LLM judge (:mod:`conversation_memory.lab.scoring`).

The **baseline** sends the whole history every turn. In replay mode it needs
no database: its turn is the system prompt, every message so far and the
reply priming, counted message by message; a turn longer than the model's
window minus the reply reserve is not counted and its probes are not asked.
In live mode it is a conversation with ``truncate`` and no cap (the whole
history while it fits the window).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conversation_memory import _config
from conversation_memory.budget import budget_for
from conversation_memory.engine import Conversation, Memory
from conversation_memory.errors import (
    ConfigurationError,
    ContextLengthExceeded,
    ConversationMemoryError,
    ModelError,
    UnknownModel,
)
from conversation_memory.lab import testmodel
from conversation_memory.lab.generate import generate
from conversation_memory.lab.results import BASELINE, ProbeResult, Results, RunResult
from conversation_memory.lab.scoring import JUDGE_PROMPT, SCORING, judge_messages, judge_verdict
from conversation_memory.lab.specs import load_strategy
from conversation_memory.lab.transcript import Probe, Transcript, request_points
from conversation_memory.registry import ModelInfo, get_model
from conversation_memory.strategies import TRUNCATE, Strategy
from conversation_memory.summarize import DEFAULT_PROMPT, ModelSummarizer, SummaryText
from conversation_memory.tokens import REPLY_PRIMING, TokenCounter, count_tokens, counter_for
from conversation_memory.types import Message

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_STRATEGIES", "LAB_VERSION", "MODES", "run"]

LAB_VERSION = "1"
"""Changes whenever the same inputs would be measured differently."""
MODES = ("replay", "live")
DEFAULT_STRATEGIES = ("truncate", "summary", "hierarchical")
DEFAULT_BUDGETS = (1000, 4000)
LAB_USER = "lab"
"""The user the replayed conversations belong to (visible with ``convmem sessions``
when ``db`` keeps them)."""

Progress = Callable[[int, int, str], None]
"""Called after every turn with (steps done, steps in all, label of the run)."""


def run(
    transcripts: Transcript | Sequence[Transcript] | None = None,
    *,
    strategies: Sequence[Any] = DEFAULT_STRATEGIES,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    mode: str = "replay",
    client: Any = None,
    backend: str | None = None,
    model: str | None = None,
    summary_model: str | None = None,
    scoring: str = "keywords",
    judge_model: str | None = None,
    baseline: bool = True,
    db: str | Path | None = None,
    probe_tokens: int = 64,
    reply_tokens: int = 256,
    progress: Progress | None = None,
) -> Results:
    """Replay ``transcripts`` through each strategy at each budget; see the module docstring.

    ``transcripts`` defaults to one :func:`generate` conversation.
    ``strategies`` are built-in names (``"summary:high=0.9,low=0.6"``),
    ``"module:Name"`` / ``"file.py:Name"`` specs, strategy objects or functions.
    ``client`` is an OpenAI client for the model; None starts the lab's
    deterministic test server (:func:`~conversation_memory.lab.testmodel.lab_server`)
    for the duration. ``backend`` names it in the results (default ``"test"``
    without a client, else ``"custom"``). ``model`` counts, prices and answers
    (default: ``CONVMEM_MODEL`` or gpt-4o-mini); ``summary_model`` and
    ``judge_model`` default to it. ``db`` keeps the replayed conversations (a
    path or URL); by default they go to a temporary SQLite file, removed after.
    """
    items = _transcripts(transcripts)
    chosen = _strategies(strategies)
    caps = _budgets(budgets)
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}", argument="mode")
    if scoring not in SCORING:
        raise ConfigurationError(
            f"scoring must be one of {SCORING}, got {scoring!r}", argument="scoring"
        )
    for name, value in (("probe_tokens", probe_tokens), ("reply_tokens", reply_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name} must be a whole number >= 1, got {value!r}")
    model = model or _config.default_model()
    info = get_model(model)
    summary_model = summary_model or model
    judge_model = judge_model or model
    replayed = [t for t in items if t.messages]
    if not replayed:
        raise ConfigurationError("every transcript is empty: there is nothing to replay")
    started = time.perf_counter()
    with ExitStack() as stack:
        if client is None:
            server = stack.enter_context(testmodel.lab_server(model=model))
            client = server.client()
            stack.callback(client.close)
            backend = backend or "test"
        from conversation_memory.llm import LLM

        steps = sum(len(_requests(t.messages, mode)) for t in replayed)
        lab = _Lab(
            llm=LLM(client),
            model=model,
            info=info,
            counter=counter_for(model),
            summary_model=summary_model,
            judge_model=judge_model,
            scoring=scoring,
            mode=mode,
            probe_tokens=probe_tokens,
            reply_tokens=reply_tokens,
            progress=progress,
            total=steps * (len(chosen) * len(caps) + (1 if baseline else 0)),
        )
        if db is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="convmem-lab-"))
            db = Path(folder) / "lab.db"
        runs: list[RunResult] = []
        timing: dict[str, float] = {}
        for strategy in chosen:
            for cap in caps:
                began = time.perf_counter()
                runs.append(_run(lab, db, replayed, strategy, cap, label=f"{strategy.name}@{cap}"))
                timing[runs[-1].label] = round(time.perf_counter() - began, 3)
        if baseline:
            began = time.perf_counter()
            if mode == "replay":
                runs.append(_baseline(lab, replayed))
            else:
                runs.append(_run(lab, db, replayed, TRUNCATE, None, label=BASELINE))
            timing[BASELINE] = round(time.perf_counter() - began, 3)
    timing["total"] = round(time.perf_counter() - started, 3)
    meta = _meta(
        lab,
        backend=backend or "custom",
        strategies=[s.name for s in chosen],
        budgets=caps,
        transcripts=items,
    )
    return Results(runs=tuple(runs), meta=meta, timing=timing)


# --- checking the arguments -------------------------------------------------------------


def _transcripts(value: Transcript | Sequence[Transcript] | None) -> list[Transcript]:
    if value is None:
        return [generate()]
    if isinstance(value, Transcript):
        return [value]
    items = list(value)
    if not items:
        raise ConfigurationError("no transcripts to replay")
    for item in items:
        if not isinstance(item, Transcript):
            raise ConfigurationError(
                f"transcripts must be Transcript objects (see read_transcripts and generate), "
                f"got {type(item).__name__}"
            )
    return items


def _strategies(specs: Sequence[Any]) -> list[Strategy]:
    if isinstance(specs, str) or not isinstance(specs, Sequence):
        specs = [specs]
    chosen = [load_strategy(spec) for spec in specs]
    if not chosen:
        raise ConfigurationError("give at least one strategy", argument="strategy")
    names = [s.name for s in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or BASELINE in names:
        raise ConfigurationError(
            f"strategy names must be distinct (and not {BASELINE!r}); repeated: "
            f"{', '.join(repeated or [BASELINE])}",
            argument="strategy",
        )
    return chosen


def _budgets(budgets: Sequence[int]) -> list[int]:
    if isinstance(budgets, int):
        budgets = [budgets]
    caps = list(budgets)
    if not caps:
        raise ConfigurationError("give at least one budget", argument="budget")
    for cap in caps:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 16:
            raise ConfigurationError(
                f"budgets must be whole numbers of tokens >= 16, got {cap!r}", argument="budget"
            )
    if len(set(caps)) != len(caps):
        raise ConfigurationError(f"budgets repeat: {caps}", argument="budget")
    return caps


def _requests(messages: Sequence[Message], mode: str) -> list[int]:
    return request_points(messages, live=mode == "live")


# --- one run --------------------------------------------------------------------------


@dataclass
class _Lab:
    """Settings shared by every run of one lab."""

    llm: Any
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

    def tick(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)

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
class _Tally:
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


class _Meter:
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


def _run(
    lab: _Lab,
    db: str | Path,
    transcripts: Sequence[Transcript],
    strategy: Strategy,
    budget: int | None,
    *,
    label: str,
) -> RunResult:
    meter = _Meter(ModelSummarizer(lab.llm, model=lab.summary_model), lab.counter)
    tally = _Tally()
    limit = budget_for(lab.model, cap=budget).limit
    with Memory(db, model=lab.model, summarizer=meter, compaction="after") as memory:
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
    lab: _Lab,
    conversation: Conversation,
    *,
    meter: _Meter,
    transcript: Transcript,
    tally: _Tally,
    label: str,
) -> None:
    requests = set(_requests(transcript.messages, lab.mode))
    probes = sorted(transcript.probes, key=lambda p: p.after)
    tools = transcript.tools if lab.mode == "replay" else None
    pending: list[dict[str, Any]] = []
    turn = tally.turn = 0
    for index, message in enumerate(transcript.messages):
        role = message.get("role")
        if role != "assistant":
            if lab.mode == "replay" or role != "tool":
                pending.append(dict(message))
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
            conversation.record(reply)
            pending = []
            price = lab.cost(tokens, completion)
            summaries = meter.take_cost()
            tally.tokens.append(tokens)
            tally.costs.append(None if price is None or summaries is None else price + summaries)
            lab.tick(label)
        elif lab.mode == "replay":
            conversation.append(dict(message))  # nothing new was said to it: no request
        if lab.mode == "live" or not message.get("tool_calls"):
            while probes and probes[0].after <= index + 1:
                _ask(
                    lab,
                    conversation,
                    probe=probes.pop(0),
                    transcript=transcript,
                    turn=turn,
                    tally=tally,
                )
    if pending:
        conversation.extend(pending)
    for probe in probes:
        _ask(lab, conversation, probe=probe, transcript=transcript, turn=turn, tally=tally)


def _prompt_tokens(conversation: Conversation) -> int:
    """The prompt tokens of what ``prepare`` just returned, as the budget counted them
    (each message's count stored at write time; tool definitions included)."""
    prepared = conversation.prepared
    assert prepared is not None
    return prepared.report.prompt


def _live_call(
    lab: _Lab,
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
    lab: _Lab,
    conversation: Conversation,
    *,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: _Tally,
) -> None:
    """Ask one probe with the context ``prepare(question)`` gives; score and note it."""
    sent = conversation.prepare(probe.question, max_tokens=lab.probe_tokens)
    _score(
        lab,
        sent,
        tokens=_prompt_tokens(conversation),
        probe=probe,
        transcript=transcript,
        turn=turn,
        tally=tally,
    )


def _score(
    lab: _Lab,
    sent: list[dict[str, Any]],
    *,
    tokens: int,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: _Tally,
) -> None:
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
        )
    )


# --- the baseline ---------------------------------------------------------------------


def _baseline(lab: _Lab, transcripts: Sequence[Transcript]) -> RunResult:
    """The whole history every turn, counted message by message (replay mode)."""
    limit = budget_for(lab.model).limit
    tally = _Tally()
    count = lab.counter.count_message
    for transcript in transcripts:
        requests = set(_requests(transcript.messages, "replay"))
        probes = sorted(transcript.probes, key=lambda p: p.after)
        history: list[dict[str, Any]] = []
        if transcript.system is not None:
            history.append({"role": "system", "content": transcript.system})
        running = sum(count(m) for m in history) + REPLY_PRIMING
        tools = lab.counter.count_tools(transcript.tools) if transcript.tools else 0
        turn = 0
        for index, message in enumerate(transcript.messages):
            if index in requests:
                turn += 1
                tokens = running + tools
                fits = tokens <= limit
                price = lab.cost(tokens, lab.reply_tokens_of(message)) if fits else None
                tally.tokens.append(tokens if fits else None)
                tally.costs.append(price)
                lab.tick(BASELINE)
            history.append(dict(message))
            running += count(message)
            if message.get("role") == "assistant" and not message.get("tool_calls"):
                while probes and probes[0].after <= index + 1:
                    _ask_full(
                        lab,
                        history,
                        running=running,
                        limit=limit,
                        probe=probes.pop(0),
                        transcript=transcript,
                        turn=turn,
                        tally=tally,
                    )
        for probe in probes:
            _ask_full(
                lab,
                history,
                running=running,
                limit=limit,
                probe=probe,
                transcript=transcript,
                turn=turn,
                tally=tally,
            )
    return RunResult(
        strategy=BASELINE,
        budget=None,
        limit=limit,
        tokens=tuple(tally.tokens),
        costs=tuple(tally.costs),
        probes=tuple(tally.probes),
        probes_skipped=tally.skipped,
    )


def _ask_full(
    lab: _Lab,
    history: list[dict[str, Any]],
    *,
    running: int,
    limit: int,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: _Tally,
) -> None:
    question = {"role": "user", "content": probe.question}
    tokens = running + lab.counter.count_message(question)
    if tokens > limit:
        tally.skipped += 1
        return
    _score(
        lab,
        [*history, question],
        tokens=tokens,
        probe=probe,
        transcript=transcript,
        turn=turn,
        tally=tally,
    )


# --- provenance -----------------------------------------------------------------------


def _meta(
    lab: _Lab,
    *,
    backend: str,
    strategies: list[str],
    budgets: list[int],
    transcripts: Sequence[Transcript],
) -> dict[str, Any]:
    from conversation_memory import __version__

    described = []
    for t in transcripts:
        history = ([{"role": "system", "content": t.system}] if t.system else []) + list(t.messages)
        described.append(
            {
                "name": t.name,
                "source": t.source,
                "messages": len(t.messages),
                "turns": len(_requests(t.messages, lab.mode)),
                "probes": len(t.probes),
                "tokens": lab.count(history, t.tools) if history else 0,
            }
        )
    return {
        "lab_version": LAB_VERSION,
        "library_version": __version__,
        "mode": lab.mode,
        "backend": backend,
        "test_model": testmodel.VERSION if backend == "test" else None,
        "model": lab.model,
        "encoding": lab.info.encoding,
        "window": lab.info.window,
        "prices_as_of": lab.info.prices_as_of,
        "summary_model": lab.summary_model,
        "summary_prompt": DEFAULT_PROMPT.version,
        "scoring": lab.scoring,
        "judge_model": lab.judge_model if lab.scoring == "judge" else None,
        "judge_prompt": JUDGE_PROMPT.version if lab.scoring == "judge" else None,
        "probe_max_tokens": lab.probe_tokens,
        "reply_max_tokens": lab.reply_tokens if lab.mode == "live" else None,
        "strategies": strategies,
        "budgets": budgets,
        "transcripts": described,
        "skipped": [t.name for t in transcripts if not t.messages],
    }
