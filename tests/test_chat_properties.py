"""Hypothesis: tool-heavy conversations reach a strict server only as valid requests.

Each example is one conversation on a small window (600 to 1,200 tokens, by
the test server's tokenizer, which is not ours): some history appended first
(parallel tool calls answered in any order or not at all, pinned messages,
unicode, empty and long texts), then two to six turns through ``send`` or
``prepare``/``record`` with the real ``openai`` SDK. The server answers with
text or with one to three parallel tool calls; the next turn answers them,
answers some, or "crashes" (appends some results, or none, and the user types
on). Strategies are truncate, window and two rolling summaries; budgets run
from tiny to large. After each example:

- the strict server refused nothing (context-length 400s are allowed: they
  are how calibration learns the server's tokenizer, and they are not
  ``server.rejections``);
- the stored history is exactly what was appended or sent, plus the replies;
- replayed with only the calls the test left unanswered taken out, the stored
  history is a valid OpenAI message sequence.

A turn whose must-send part can't fit raises ``BudgetExceeded``; the example
ends there (no request is made, or only context-length 400s were). So does a
turn refused for its length twice (the refit after a context-length 400 is
tried once). Compaction after a stored turn must never raise out of
``send``/``record`` (a test at the end pins the case that once did).

One ``Memory`` (in-memory SQLite) serves every example, each in a conversation
of its own: opening a ``Memory`` runs the migrations (~50 ms), which alone
would take 100 s over 2,000 examples.
"""

from __future__ import annotations

import itertools
import json
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conversation_memory import (
    BudgetExceeded,
    ContextLengthExceeded,
    Memory,
    count_tokens,
    register_model,
)
from conversation_memory.engine import Conversation
from conversation_memory.llm import context_limits
from conversation_memory.messages import normalize, validate
from conversation_memory.testing import ChatServer, RecordingSummarizer, refusals, tokenizer

pytestmark = pytest.mark.slow

WINDOWS = (600, 900, 1200)
MAX_OUTPUT = 64
STRATEGIES = ("truncate", "window:3", "summary", "summary:high=0.7,low=0.4")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object"},
        },
    }
]
SUMMARY_HEADER = "Summary of the earlier conversation"


def model_for(window: int) -> str:
    return f"chat-prop-{window}"


SAMPLES = [
    "",
    "hi",
    "héllo wörld",
    "日本語のテキスト",
    "🙂👍🏽" * 3,
    "a\nb\tc",
    "e\u0301\u200d",
    "שלום",
    "Alice met Bob in Paris at 42 Rue Cler.",
]
MEDIUM = [
    "The quick brown fox jumps over the lazy dog. " * 10,
    "Der schnelle braune Fuchs springt über den faulen Hund. " * 5,
    "数据库中的每条消息 都只追加， 从不改写。 " * 8,
]
"""About 100 to 150 tokens each."""
LONG = ["x" * 5000, "word " * 400, "長い文章" * 120]
"""400 to 1,700 tokens: over the small windows by the server's count, or nearly."""
pool = st.sampled_from([*SAMPLES * 8, *MEDIUM * 4, *LONG])
random_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
short_texts = st.sampled_from(SAMPLES) | random_text
texts = st.one_of(pool, pool, pool, random_text)
"""Unicode, empty, medium and (about one in forty) long texts; one draw or a few each."""
history_texts = st.sampled_from([*SAMPLES * 2, *MEDIUM * 6, LONG[1]])
"""The history before the turns leans to medium texts, so that summaries get made (the
test summarizer keeps whole words: one 5,000-character word makes its summary too big)."""


def brief(value: Any) -> str:
    """``repr`` with long texts written as ``LONG[i]`` or ``MEDIUM[i]`` (for Hypothesis' report)."""
    if isinstance(value, str):
        for name, group in (("LONG", LONG), ("MEDIUM", MEDIUM)):
            if value in group:
                return f"{name}[{group.index(value)}]"
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(brief(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(brief(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {brief(v)}" for k, v in value.items()) + "}"
    if is_dataclass(value):
        args = ", ".join(f"{f.name}={brief(getattr(value, f.name))}" for f in fields(value))
        return f"{type(value).__name__}({args})"
    return repr(value)


# --- what an example does --------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Turn:
    via: str
    """``send`` or ``prepare`` (then the SDK client and ``record``)."""
    text: str
    """The user's message."""
    calls: int
    """Tool calls the server answers with (0: text)."""
    reply_text: str
    max_tokens: int | None
    answers: tuple[int, ...]
    """Which open calls get an answer, in this order (indexes past the open calls ignored)."""
    results: tuple[str, str, str]
    tools: bool
    """Offer the tool definitions (always when ``calls``)."""
    extra: str
    """``crash``: append the answers (if any) and have the user type on, instead of sending
    them; ``with_user``: send the user's message with the answers; ``pin_note``: append a
    pinned user note first (when no call is open); ``fail_summary``: the summarizer fails
    once."""

    __repr__ = brief

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(brief(self))


ORDERED_PICKS = [p for n in range(4) for p in itertools.permutations(range(3), n)]
turns = st.builds(
    Turn,
    via=st.sampled_from(["send", "send", "prepare"]),
    text=texts,
    calls=st.sampled_from([0, 0, 0, 1, 1, 2, 3]),
    reply_text=texts,
    max_tokens=st.sampled_from([None, None, None, 1, 5, 16, 40, MAX_OUTPUT]),
    answers=st.sampled_from(ORDERED_PICKS),
    results=st.tuples(texts, short_texts, short_texts),
    tools=st.booleans(),
    extra=st.sampled_from(
        ["", "", "", "", "crash", "crash", "with_user", "pin_note", "fail_summary"]
    ),
)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[dict[str, Any], bool]]:
    """History appended before the turns, as (message, pinned); tool calls left open at times."""
    out: list[tuple[dict[str, Any], bool]] = []
    made = 0
    for kind in draw(st.lists(st.sampled_from("uuaatts"), max_size=14)):
        pinned = draw(st.integers(0, 9)) == 0
        if kind == "u":
            out.append(({"role": "user", "content": draw(history_texts)}, pinned))
        elif kind == "a":
            out.append(({"role": "assistant", "content": draw(history_texts)}, pinned))
        elif kind == "s":
            out.append(({"role": "system", "content": draw(short_texts)}, pinned))
        else:
            ids = [f"pre_{made + n}" for n in range(draw(st.integers(1, 3)))]
            made += len(ids)
            calls = [
                {"id": i, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
                for i in ids
            ]
            content = draw(st.none() | short_texts)
            out.append(({"role": "assistant", "content": content, "tool_calls": calls}, pinned))
            for n in draw(st.sampled_from(ORDERED_PICKS)):
                if n < len(ids):
                    content = draw(short_texts)
                    result = {"role": "tool", "tool_call_id": ids[n], "content": content}
                    out.append((result, False))
    return out


@dataclass(frozen=True, repr=False)
class Case:
    window: int
    strategy: str
    budget: int | None
    system: str | None
    history: list[tuple[dict[str, Any], bool]]
    turns: list[Turn]

    __repr__ = brief

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(brief(self))


cases = st.builds(
    Case,
    window=st.sampled_from(WINDOWS),
    strategy=st.sampled_from(STRATEGIES),
    budget=st.none() | st.integers(60, 400) | st.integers(400, 2000),
    system=st.none() | short_texts | st.just("You are a helpful assistant. " * 8),
    history=histories(),
    turns=st.lists(turns, min_size=2, max_size=6),
)


# --- the server's side -----------------------------------------------------------------


@dataclass
class Script:
    """The server's ``reply=``: text, or tool calls when the plan asks and tools are offered."""

    turn: Turn | None = None
    made: list[dict[str, Any]] = field(default_factory=list)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def __call__(self, body: dict[str, Any]) -> Any:
        turn = self.turn
        if turn is None:
            return None
        if turn.calls and body.get("tools"):
            self.made = [
                {
                    "id": f"call_{next(self.ids)}",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"q": str(n)})},
                }
                for n in range(turn.calls)
            ]
            return {"content": None, "tool_calls": self.made}
        self.made = []
        return turn.reply_text


@dataclass(repr=False)
class Env:
    """What every example shares (module scope)."""

    server: ChatServer
    client: openai.OpenAI
    memory: Memory
    summarizer: RecordingSummarizer
    script: Script
    stats: Counter[str]

    def __repr__(self) -> str:
        return "Env(...)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    for window in WINDOWS:
        register_model(model_for(window), window=window, max_output=MAX_OUTPUT)
    script = Script()
    summarizer = RecordingSummarizer(words_per_message=3)
    stats: Counter[str] = Counter()
    # The whole request log: requests are compared by position across examples.
    with ChatServer(window=WINDOWS[0], strict=True, reply=script, keep_requests=None) as server:
        client = server.client()
        memory = Memory(
            ":memory:",
            client=client,
            model=model_for(WINDOWS[0]),
            summarizer=summarizer,
            sleep=lambda _seconds: None,
        )
        try:
            yield Env(server, client, memory, summarizer, script, stats)
        finally:
            memory.close()
            client.close()
    if stats:
        print("\nchat property stats:", dict(sorted(stats.items())))


# --- running an example ----------------------------------------------------------------


class Stop(Exception):
    """The example ends here (a refusal the test allows)."""


def from_compaction(error: BaseException) -> bool:
    """Whether ``error`` was raised inside the compaction that runs after a stored turn."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.name == "after_turn" for frame in frames)


@dataclass
class Run:
    env: Env
    case: Case
    conversation: Conversation
    expected: list[dict[str, Any]] = field(default_factory=list)
    """Every message appended or sent, and every reply, in order."""
    open_calls: list[str] = field(default_factory=list)
    """Calls of the newest tool-calling message that have no answer yet."""
    unanswered: set[str] = field(default_factory=set)
    """Calls the test left without an answer and moved on (crash gaps)."""

    @property
    def model(self) -> str:
        return model_for(self.case.window)

    def stored(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Note messages that are now stored, tracking which calls were left unanswered."""
        for entry in messages:
            message = normalize(entry)
            self.expected.append(message)
            if message["role"] == "tool":
                self.open_calls.remove(message["tool_call_id"])
                continue
            self.unanswered.update(self.open_calls)
            self.open_calls = [call["id"] for call in message.get("tool_calls") or ()]

    def append_history(self) -> None:
        batch: list[dict[str, Any]] = []
        for message, pinned in self.case.history:
            if pinned:
                self.extend(batch)
                batch = []
                self.refusable(lambda m=message: self.conversation.append(m, pinned=True))
                self.stored([message])
            else:
                batch.append(message)
        self.extend(batch)

    def extend(self, messages: list[dict[str, Any]]) -> None:
        if messages:
            self.refusable(lambda: self.conversation.extend(messages))
            self.stored(messages)

    def refusable(self, run: Any, where: str = "append") -> Any:
        """Run ``run``; a BudgetExceeded ends the example (it must come with no valid request)."""
        before = len(self.env.server.chat_requests)
        try:
            return run()
        except BudgetExceeded as error:
            if from_compaction(error):
                raise  # compaction after a stored turn must never fail the turn
            after = self.env.server.chat_requests[before:]
            assert all(overflowed(request, self.case.window) for request in after)
            self.env.stats["refused"] += 1
            when = "after a 400" if after else "before any request"
            event(f"refused: BudgetExceeded at {where}, {when}")
            raise Stop from None

    def turn_input(self, turn: Turn) -> list[dict[str, Any]]:
        user = {"role": "user", "content": turn.text}
        if not self.open_calls:
            if turn.extra == "pin_note":
                note = {"role": "user", "content": f"Remember: {turn.text[:40]}"}
                self.refusable(lambda: self.conversation.append(note, pinned=True))
                self.stored([note])
            return [user]
        results = [
            {"role": "tool", "tool_call_id": self.open_calls[i], "content": turn.results[n]}
            for n, i in enumerate(i for i in turn.answers if i < len(self.open_calls))
        ]
        if turn.extra == "crash" or not results:
            self.env.stats["crash"] += 1
            self.extend(results)
            return [user]
        return [*results, user] if turn.extra == "with_user" else results

    def play(self, turn: Turn) -> None:
        env = self.env
        new = self.turn_input(turn)
        tools = TOOLS if turn.calls or turn.tools else None
        env.script.turn = turn
        env.script.made = []
        if turn.extra == "fail_summary":
            env.summarizer.fail_next(1)
        if turn.via == "send":
            params = {} if turn.max_tokens is None else {"max_tokens": turn.max_tokens}
            try:
                reply = self.refusable(
                    lambda: self.conversation.send(new, tools=tools, **params), "send"
                )
            except ContextLengthExceeded:
                env.stats["overflowed twice"] += 1
                event("refused: context length even after the refit")
                raise Stop from None
        else:
            reply = self.bring_your_own_client(new, tools, turn.max_tokens)
        assert reply.tool_calls == env.script.made
        self.stored([*new, reply.message])
        env.stats["turns"] += 1
        env.stats["tool calls"] += len(reply.tool_calls)

    def bring_your_own_client(
        self, new: list[dict[str, Any]], tools: Any, max_tokens: int | None
    ) -> Any:
        """prepare, the SDK, record; on a context-length 400, calibrate and prepare again once."""
        conversation = self.conversation
        options: dict[str, Any] = {"model": self.model}
        if tools:
            options["tools"] = tools
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        messages = self.refusable(
            lambda: conversation.prepare(new, tools=tools, max_tokens=max_tokens), "prepare"
        )
        try:
            completion = self.env.client.chat.completions.create(messages=messages, **options)
        except openai.BadRequestError as error:
            _, requested = context_limits(error.body, error.message)
            if not requested:
                raise
            counted = count_tokens(messages, model=self.model, tools=tools)
            conversation.calibrate(counted=counted, reported=requested)
            messages = self.refusable(
                lambda: conversation.prepare(new, tools=tools, max_tokens=max_tokens), "prepare"
            )
            try:
                completion = self.env.client.chat.completions.create(messages=messages, **options)
            except openai.BadRequestError:
                self.env.stats["overflowed twice"] += 1
                event("refused: context length even after the refit")
                raise Stop from None
        return self.refusable(lambda: conversation.record(completion), "record")


def overflowed(request: Any, window: int) -> bool:
    """A 400 for a prompt over the window (by the server's count), not for its messages."""
    if request.status != 400:
        return False
    body = request.body
    prompt = tokenizer.count_tokens(body["messages"], tools=body.get("tools"))
    return prompt + (tokenizer.max_tokens_of(body) or 0) > window


def replay(history: list[dict[str, Any]], gaps: set[str]) -> list[dict[str, Any]]:
    """The history with only the test's crash gaps taken out of ``tool_calls``."""
    out = []
    for stored in history:
        message = dict(stored)
        calls = message.pop("tool_calls", None)
        if calls:
            kept = [call for call in calls if call["id"] not in gaps]
            if kept:
                message["tool_calls"] = kept
            elif message.get("content") is None:
                continue
        out.append(message)
    return out


def check_requests(run: Run) -> None:
    server = run.env.server
    assert server.rejections == []
    stored_calls = {
        call["id"]: {c["id"] for c in message["tool_calls"]}
        for message in run.expected
        for call in message.get("tool_calls") or ()
    }
    for request in server.chat_requests:
        assert request.status in (200, 400), request.status
        if request.status == 400:
            assert overflowed(request, run.case.window)
            run.env.stats["context-length 400"] += 1
            event("a context-length 400 (calibration)")
            continue
        messages = request.body["messages"]
        validate(messages)
        assert not any(
            call["id"] in run.unanswered
            for message in messages
            for call in message.get("tool_calls") or ()
        )
        for message in messages:
            sent = {call["id"] for call in message.get("tool_calls") or ()}
            if sent and sent != stored_calls[next(iter(sent))]:
                run.env.stats["repaired messages sent"] += 1
                event("a request carried a repaired tool-call message")
            if message["role"] == "system" and SUMMARY_HEADER in str(message["content"]):
                event("a request carried a summary")


def check_history(run: Run) -> None:
    history = run.conversation.history()
    assert history == run.expected  # nothing lost, nothing added, order kept
    gaps = run.unanswered | set(run.open_calls)  # open calls at the end: still awaited
    replayed = replay(history, gaps)
    if replayed:
        validate(replayed)
        assert refusals.validate({"model": run.model, "messages": replayed}) is None


def count_summaries(memory: Memory, conversation_id: str) -> int:
    with memory.database.engine.connect() as conn:
        query = sa.text("SELECT count(*) FROM summaries WHERE conversation_id = :id")
        return int(conn.execute(query, {"id": conversation_id}).scalar_one())


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases)
def test_every_request_the_server_sees_is_valid(env: Env, case: Case) -> None:
    env.server.reset()
    env.server.window = case.window
    env.script.turn = None
    summaries_before = len(env.summarizer.calls)
    errors_before = len(env.server.errors)
    conversation = env.memory.conversation(
        model=model_for(case.window),
        system=case.system,
        strategy=case.strategy,
        budget=case.budget,
    )
    run = Run(env, case, conversation)
    env.stats["examples"] += 1
    try:
        run.append_history()
        for turn in case.turns:
            run.play(turn)
        event("all turns done")
    except Stop:
        pass
    finally:
        env.summarizer.recover()
        env.script.turn = None
    env.stats["summarizer calls"] += len(env.summarizer.calls) - summaries_before
    summaries = count_summaries(env.memory, conversation.id)
    env.stats["summaries stored"] += summaries
    event(f"summaries stored: {bool(summaries)}")
    event(f"tool calls: {any(m.get('tool_calls') for m in run.expected)}")
    event(f"crash gaps: {bool(run.unanswered)}")
    assert env.server.errors[errors_before:] == []
    check_requests(run)
    check_history(run)


def test_compaction_never_raises_over_a_stored_turn(env: Env) -> None:
    env.server.reset()
    env.server.window = 600
    env.script.turn = None
    conversation = env.memory.conversation(model=model_for(600), strategy="summary")
    try:
        conversation.send("hi", max_tokens=MAX_OUTPUT)
        env.server.reply = "日本語のテキスト" * 7  # 56 tokens, under max_tokens
        # 484 of the 536-token limit, counted alike by us and the server: it fits
        conversation.send("日本語のテキスト" * 60, max_tokens=MAX_OUTPUT)
    finally:
        env.server.reply = env.script
    assert [r.status for r in env.server.chat_requests] == [200, 200]
    # The newest turn is now 544 tokens: nothing can be sent until the user types again,
    # but compacting (what send/record do after a turn) must not raise.
    outcome = conversation.compact()
    assert outcome.error is None
