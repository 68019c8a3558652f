"""Long synthetic conversations with planted facts and probe questions.

So that the lab is useful with no data at all. A generated conversation is
small talk about hobbies (a user asks, the assistant answers, 1-4 sentences
each by default) in which some user turns also state one *fact* about someone:
"By the way, my sister's locker code is 4821." Each fact is a different
(person, attribute) pair with a value used nowhere else in the conversation,
and sits at a random place among the message's sentences. The assistant only
acknowledges it ("Noted."), never repeats it.

Every ``probe_every`` turns a probe asks about one fact planted earlier,
picked at random ("What is my sister's locker code?"); it is answered right
when the answer contains the value. The probe records the fact's age in turns,
so recall can be read against how long ago something was said, and names its
evidence: the message that states the fact.

The conversation the lab's memory figures are meant for is longer and harder
(``generate(sessions=10, paraphrase=True, final_probes=20)``, and
:func:`generate_corpus` for many): it is held over dated sessions between two
named speakers, each session opening with a header that carries its date;
some facts become events of "yesterday", asked for by their date; and every
probe is asked in other words than its fact
(:mod:`~conversation_memory.lab.paraphrase`), after the last message, about
the earlier sessions. Neither a reader nor a word search can then find the
fact by its own words: only what the context still carries counts.

Everything is drawn from one ``random.Random(seed)``: the same arguments give
the same conversation, byte for byte, on any machine.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.lab.paraphrase import ATTRIBUTE_QUESTIONS, EVENTS, OWNER_REFERENCES
from conversation_memory.lab.transcript import MONTHS, Probe, Session, Transcript, session_header

__all__ = ["GENERATOR_VERSION", "generate", "generate_corpus"]

GENERATOR_VERSION = "facts-v2"
"""Changes whenever the same arguments would generate a different transcript (v2: probes
name their evidence; the conversations of v1 arguments are unchanged)."""

SYSTEM = "You are a helpful assistant. Answer briefly."
START = dt.date(2024, 1, 8)
"""The date of the first session of a multi-session conversation, by default."""
_USER_NAMES = ("Maya", "Tomas", "Ines", "Kofi", "Lena", "Arjun", "Sofia", "Mateo", "Yuki", "Noor")
_ASSISTANT_NAMES = ("Sage", "Robin", "Quinn", "Ari")

_OWNERS = (
    "my sister",
    "my brother",
    "my neighbour",
    "my manager",
    "my dentist",
    "my landlord",
    "my cousin",
    "my coach",
    "my grandmother",
    "my best friend",
    "my accountant",
    "my piano teacher",
    "my flatmate",
    "my uncle",
    "my aunt",
)
_CITIES = (
    "Tartu", "Ghent", "Porto", "Kraków", "Aarhus", "Bergen", "Lyon", "Turin", "Utrecht",
    "Graz", "Brno", "Tampere", "Cluj", "Bilbao", "Leipzig", "Malmö", "Cork", "Split",
)  # fmt: skip
_PETS = (
    "Biscuit", "Mochi", "Pepper", "Juniper", "Ziggy", "Clementine", "Waffles", "Pickle",
    "Nimbus", "Tofu", "Marmalade", "Pretzel", "Saffron", "Gizmo", "Noodle", "Basil",
)  # fmt: skip
_COLOURS = (
    "teal", "maroon", "ochre", "lilac", "olive", "coral", "indigo", "mustard",
    "mint green", "burgundy", "turquoise", "amber", "charcoal", "lavender", "crimson", "navy",
)  # fmt: skip
_CARS = (
    "Volvo", "Skoda", "Subaru", "Peugeot", "Fiat", "Mazda", "Renault", "Saab", "Lancia",
    "Citroën", "Dacia", "Seat", "Opel", "Alfa Romeo", "Kia", "Mini",
)  # fmt: skip
_BOOKS = (
    "Middlemarch", "Dune", "Beloved", "Ulysses", "Rebecca", "Emma", "Solaris", "Persuasion",
    "Ivanhoe", "Walden", "Siddhartha", "Kindred", "Frankenstein", "Dracula", "Lolita", "Hamlet",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Attribute:
    statement: str
    """Formatted with ``owner`` (possessive) and ``value``."""
    question: str
    kind: str


_ATTRIBUTES = (
    _Attribute("{owner} locker code is {value}.", "What is {owner} locker code?", "code"),
    _Attribute("{owner} home town is {value}.", "What is {owner} home town?", "city"),
    _Attribute("{owner} cat is called {value}.", "What is {owner} cat called?", "pet"),
    _Attribute(
        "{owner} favourite colour is {value}.", "What is {owner} favourite colour?", "colour"
    ),
    _Attribute("{owner} car is a {value}.", "What kind of car is {owner} car?", "car"),
    _Attribute("{owner} birthday is on {value}.", "When is {owner} birthday?", "date"),
    _Attribute("{owner} flight number is {value}.", "What is {owner} flight number?", "flight"),
    _Attribute("{owner} favourite book is {value}.", "What is {owner} favourite book?", "book"),
    _Attribute(
        "{owner} hotel room number is {value}.", "What is {owner} hotel room number?", "room"
    ),
)

_TOPICS = (
    "sourdough baking", "container gardening", "bird watching", "trail running",
    "watercolour painting", "home espresso", "chess openings", "urban cycling",
    "stargazing", "learning Portuguese", "pottery", "jazz piano", "rock climbing",
    "budget travel", "composting", "woodworking", "film photography", "meal planning",
    "houseplants", "board games", "knitting", "sea swimming", "beekeeping", "calligraphy",
)  # fmt: skip
_USER_LINES = (
    "I have been reading about {a} this week.",
    "Can you tell me more about {a}?",
    "What do you think about {a} and {b}?",
    "My plan for the weekend involves {a}.",
    "Yesterday I spent a few hours on {a}.",
    "It would help to compare {a} with {b}.",
    "I keep wondering whether {a} is worth the effort.",
    "A friend suggested I try {a}.",
    "How long does it take to get decent at {a}?",
    "Is {a} expensive to start with?",
    "I would rather not spend much on {b}.",
    "Last month I gave up on {b}, sadly.",
)
_ASSISTANT_LINES = (
    "{A} is a broad subject with many angles.",
    "Many people start with {a} and build from there.",
    "A common approach is to take {a} one small step at a time.",
    "It depends on your goals and the time you have.",
    "Comparing {a} and {b} shows some useful trade-offs.",
    "You could try {a} for a week and see how it feels.",
    "Most beginners find {a} easier than they expected.",
    "Good equipment helps, but practice matters more.",
    "Local clubs are a friendly way into {a}.",
    "Set a modest target and review it after a month.",
    "There are plenty of free guides on {a}.",
    "Mixing {a} with {b} keeps things interesting.",
)
_LEADS = ("By the way, ", "Oh, and ", "Before I forget, ", "Also, ", "")
_ACKS = ("Noted.", "Got it, thanks.", "Thanks, noted.", "Understood.")


@dataclass(frozen=True, slots=True)
class _Fact:
    """A fact planted in the conversation, and how a probe asks for it."""

    turn: int
    session: int
    question: str
    expect: tuple[str, ...]
    regex: str | None
    answer: str
    kind: str
    evidence: tuple[int, ...]


def generate(
    turns: int = 200,
    *,
    seed: int = 0,
    fact_rate: float = 0.15,
    probe_every: int = 10,
    sentences: tuple[int, int] = (1, 4),
    system: str | None = SYSTEM,
    sessions: int = 1,
    paraphrase: bool = False,
    final_probes: int = 0,
    start: dt.date | str = START,
) -> Transcript:
    """A conversation of ``turns`` user/assistant exchanges, with facts and probes.

    ``fact_rate`` is the share of user turns that plant a fact (at most one
    per turn, and at most one per person and attribute: 135 in all);
    ``probe_every`` puts a probe after every that many turns once a fact
    exists (0: no probes); ``sentences`` is the (min, max) number of sentences
    of small talk per message. Every probe names its evidence: the message
    that states the fact (and, for a date, the one that opens its session).

    ``sessions`` > 1 holds the conversation over that many sessions of about
    equal length, days apart from ``start`` (an ISO date), between two named
    speakers; each session's first message opens with its header (date
    included), and some facts become events of "yesterday" whose date a probe
    asks for. ``paraphrase`` asks every probe in other words than its fact's
    (:mod:`~conversation_memory.lab.paraphrase`). ``final_probes`` asks that
    many more after the last message, about distinct facts of the sessions
    before the last (of any turn with one session). With the defaults the
    conversation is the one earlier versions generated, byte for byte.
    """
    _check(turns, fact_rate, probe_every, sentences)
    _check_sessions(turns, sessions, final_probes)
    first_day = _date(start)
    rng = random.Random(seed)
    pairs = [(owner, attribute) for owner in _OWNERS for attribute in _ATTRIBUTES]
    rng.shuffle(pairs)
    # Everything multi-session is drawn only when asked for, so one session draws as before.
    dated = sessions > 1
    plan = _sessions(rng, turns, sessions, first_day) if dated else [(1, None)]
    speakers = (rng.choice(_USER_NAMES), rng.choice(_ASSISTANT_NAMES)) if dated else None
    events = [(owner, event) for owner in _OWNERS for event in EVENTS] if dated else []
    if events:
        rng.shuffle(events)
    starts = {first: (number, date) for number, (first, date) in enumerate(plan, start=1)}
    used: list[str] = []
    planted: list[_Fact] = []
    messages: list[dict[str, str]] = []
    probes: list[Probe] = []
    found: list[Session] = []
    low, high = sentences
    session, session_date, opened, event_told = 1, plan[0][1], 0, False
    for turn in range(1, turns + 1):
        header = None
        if dated and turn in starts:
            session, session_date = starts[turn]
            opened, event_told = len(messages), False
            found.append(Session(start=opened, date=session_date, number=session))
            header = session_header(session, session_date)
        lines = [_line(rng, _USER_LINES) for _ in range(rng.randint(low, high))]
        fact = pairs and rng.random() < fact_rate
        if fact:
            sentence, evidence, how = _plant(
                rng,
                pairs,
                [] if event_told else events,
                used,
                date=session_date,
                opened=opened,
                at=len(messages),
                paraphrase=paraphrase,
            )
            event_told = event_told or how[-1] == "event"
            lines.insert(rng.randint(0, len(lines)), sentence)
            planted.append(_Fact(turn, session, *how, evidence=evidence))
        text = " ".join(lines)
        messages.append(_said("user", f"{header}\n{text}" if header else text, speakers))
        reply = [_line(rng, _ASSISTANT_LINES) for _ in range(rng.randint(low, high))]
        if fact:
            reply.insert(0, rng.choice(_ACKS))
        messages.append(_said("assistant", " ".join(reply), speakers))
        if probe_every and turn % probe_every == 0 and planted:
            chosen = planted[rng.randrange(len(planted))]
            probes.append(_probe(chosen, after=len(messages), turn=turn, extra=dated or paraphrase))
    if final_probes:
        earlier = [f for f in planted if f.session < session] if dated else planted
        picked = sorted(rng.sample(earlier, min(final_probes, len(earlier))), key=_turn)
        probes.extend(_probe(f, after=len(messages), turn=turns, extra=True) for f in picked)
    options = {"sessions": sessions, "paraphrase": paraphrase, "final_probes": final_probes}
    if dated:
        options["start"] = str(plan[0][1])
    return Transcript(
        name=f"generated-{turns}t-seed{seed}" + (f"-{sessions}s" if dated else ""),
        messages=tuple(messages),
        system=system,
        probes=tuple(probes),
        source=_source(
            f"turns={turns}, seed={seed}, fact_rate={fact_rate}, probe_every={probe_every}, "
            f"sentences={tuple(sentences)}",
            options if dated or paraphrase or final_probes else {},
        ),
        sessions=tuple(found),
    )


def _source(settings: str, options: dict[str, Any]) -> str:
    """How a conversation was generated (new options only when used, as before them)."""
    more = "".join(f", {key}={value!r}" for key, value in options.items())
    return f"generate({settings}{more}) [{GENERATOR_VERSION}]"


def generate_corpus(
    conversations: int = 20,
    *,
    turns: int = 300,
    sessions: int = 10,
    seed: int = 0,
    fact_rate: float = 0.15,
    final_probes: int = 20,
    paraphrase: bool = True,
    sentences: tuple[int, int] = (1, 4),
) -> list[Transcript]:
    """Long multi-session conversations with paraphrased probes at the end: the corpus
    evidence retention is measured on (``bench/bench_recall.py``).

    Conversation ``n`` is ``generate(turns, seed=seed * 1000 + n, sessions=sessions,
    paraphrase=paraphrase, final_probes=final_probes, probe_every=0)``: each asks,
    after its last message, about facts of its earlier sessions.
    """
    if isinstance(conversations, bool) or not isinstance(conversations, int) or conversations < 1:
        raise ConfigurationError(
            f"conversations must be a whole number >= 1, got {conversations!r}"
        )
    return [
        generate(
            turns,
            seed=seed * 1000 + n,
            fact_rate=fact_rate,
            probe_every=0,
            sentences=sentences,
            sessions=sessions,
            paraphrase=paraphrase,
            final_probes=final_probes,
        )
        for n in range(conversations)
    ]


def _turn(fact: _Fact) -> int:
    return fact.turn


def _probe(fact: _Fact, *, after: int, turn: int, extra: bool) -> Probe:
    meta: dict[str, Any] = {"planted_turn": fact.turn, "age": turn - fact.turn}
    if extra:  # one-session, plain conversations keep the meta they always had
        meta.update(session=fact.session, kind=fact.kind)
    return Probe(
        after=after,
        question=fact.question,
        expect=fact.expect,
        regex=fact.regex,
        answer=fact.answer,
        meta=meta,
        evidence=fact.evidence,
    )


def _said(role: str, content: str, speakers: tuple[str, str] | None) -> dict[str, str]:
    message = {"role": role, "content": content}
    if speakers is not None:
        message["name"] = speakers[0] if role == "user" else speakers[1]
    return message


_How = tuple[str, tuple[str, ...], str | None, str, str]
"""How a probe asks for a fact: question, expect, regex, answer, kind."""


def _plant(
    rng: random.Random,
    pairs: list[tuple[str, _Attribute]],
    events: list[tuple[str, tuple[str, str, str]]],
    used: list[str],
    *,
    date: dt.date | None,
    opened: int,
    at: int,
    paraphrase: bool,
) -> tuple[str, tuple[int, ...], _How]:
    """A fact for the user message about to be written at index ``at``: its sentence, its
    evidence (with, for an event of yesterday, the message ``opened`` that dates the
    session), and how to ask for it. Events are drawn only when ``events`` has some."""
    if events and date is not None and rng.random() < 0.3:
        owner, event = events.pop()
        sentence, how = _event(rng, owner, event, date, paraphrase=paraphrase)
        return sentence, tuple(sorted({opened, at})), how
    sentence, how = _attribute(rng, pairs.pop(), used, paraphrase=paraphrase)
    return sentence, (at,), how


def _attribute(
    rng: random.Random, pair: tuple[str, _Attribute], used: list[str], *, paraphrase: bool
) -> tuple[str, _How]:
    """The sentence stating ``pair``'s attribute of its owner, and how to ask for it."""
    owner, attribute = pair
    value = _value(rng, attribute.kind, used)
    possessive = f"{owner}'s"
    statement = attribute.statement.format(owner=possessive, value=value)
    lead = rng.choice(_LEADS)
    sentence = lead + statement if lead else statement[0].upper() + statement[1:]
    question = (
        ATTRIBUTE_QUESTIONS[attribute.kind].format(who=OWNER_REFERENCES[owner])
        if paraphrase
        else attribute.question.format(owner=possessive)
    )
    return sentence, (question, (value,), None, sentence, attribute.kind)


def _event(
    rng: random.Random, owner: str, event: tuple[str, str, str], date: dt.date, *, paraphrase: bool
) -> tuple[str, _How]:
    """The sentence telling that ``owner`` did ``event`` yesterday, and how to ask for it."""
    said, direct, other = event
    when = date - dt.timedelta(days=1)
    if rng.random() < 0.5:
        sentence = f"Yesterday {owner} {said}."
    else:
        sentence = f"{owner[0].upper()}{owner[1:]} {said} yesterday."
    who = OWNER_REFERENCES[owner] if paraphrase else owner
    question = f"On what date did {who} {other if paraphrase else direct}?"
    month = MONTHS[when.month - 1]
    suffix = r"(?:st|nd|rd|th)?"
    regex = rf"\b(?:{when.day}{suffix}\s+(?:of\s+)?{month}|{month}\s+{when.day}{suffix})\b"
    answer = f"{when.day} {month} {when.year}"
    return sentence, (question, (), regex, answer, "event")


def _sessions(
    rng: random.Random, turns: int, count: int, start: dt.date
) -> list[tuple[int, dt.date | None]]:
    """(first turn, date) of each session: turns shared out evenly, 1 to 12 days apart."""
    plan: list[tuple[int, dt.date | None]] = []
    date = start
    for n in range(count):
        plan.append((1 + n * turns // count, date))
        date += dt.timedelta(days=rng.randint(1, 12))
    return plan


def _date(value: dt.date | str) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"start must be a date or an ISO date such as '2024-01-08', got {value!r}"
        ) from None


def _check_sessions(turns: int, sessions: int, final_probes: int) -> None:
    if isinstance(sessions, bool) or not isinstance(sessions, int) or not 1 <= sessions <= turns:
        raise ConfigurationError(
            f"sessions must be a whole number from 1 to the turns ({turns}), got {sessions!r}"
        )
    if isinstance(final_probes, bool) or not isinstance(final_probes, int) or final_probes < 0:
        raise ConfigurationError(f"final_probes must be a whole number >= 0, got {final_probes!r}")


def _check(turns: int, fact_rate: float, probe_every: int, sentences: tuple[int, int]) -> None:
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise ConfigurationError(f"turns must be a whole number >= 1, got {turns!r}")
    if not isinstance(fact_rate, int | float) or not 0 <= fact_rate <= 1:
        raise ConfigurationError(f"fact_rate must be between 0 and 1, got {fact_rate!r}")
    if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 0:
        raise ConfigurationError(f"probe_every must be a whole number >= 0, got {probe_every!r}")
    try:
        low, high = sentences
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"sentences must be a (min, max) pair, got {sentences!r}"
        ) from None
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ConfigurationError(
            f"sentences must be whole numbers with 1 <= min <= max, got {sentences!r}"
        )


def _line(rng: random.Random, templates: tuple[str, ...]) -> str:
    a, b = rng.sample(_TOPICS, 2)
    return rng.choice(templates).format(a=a, b=b, A=a[0].upper() + a[1:])


def _value(rng: random.Random, kind: str, used: list[str]) -> str:
    """A value for a fact, different from every value used so far."""
    while True:
        if kind == "code":
            value = str(rng.randint(1000, 9999))
        elif kind == "room":
            value = str(rng.randint(100, 999))
        elif kind == "flight":
            value = f"{rng.choice('BKLQSTUW')}{rng.choice('AFHJMRXZ')}{rng.randint(100, 9999)}"
        elif kind == "date":
            value = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
        else:
            pool = {
                "city": _CITIES,
                "pet": _PETS,
                "colour": _COLOURS,
                "car": _CARS,
                "book": _BOOKS,
            }[kind]
            value = rng.choice(pool)
        if value not in used:
            used.append(value)
            return value
