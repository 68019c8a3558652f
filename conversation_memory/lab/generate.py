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
so recall can be read against how long ago something was said.

Everything is drawn from one ``random.Random(seed)``: the same arguments give
the same conversation, byte for byte, on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conversation_memory.errors import ConfigurationError
from conversation_memory.lab.transcript import Probe, Transcript

__all__ = ["GENERATOR_VERSION", "generate"]

GENERATOR_VERSION = "facts-v1"
"""Changes whenever the same arguments would generate a different conversation."""

SYSTEM = "You are a helpful assistant. Answer briefly."

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
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
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


def generate(
    turns: int = 200,
    *,
    seed: int = 0,
    fact_rate: float = 0.15,
    probe_every: int = 10,
    sentences: tuple[int, int] = (1, 4),
    system: str | None = SYSTEM,
) -> Transcript:
    """A conversation of ``turns`` user/assistant exchanges, with facts and probes.

    ``fact_rate`` is the share of user turns that plant a fact (at most one
    per turn, and at most one per person and attribute: 135 in all);
    ``probe_every`` puts a probe after every that many turns once a fact
    exists (0: no probes); ``sentences`` is the (min, max) number of sentences
    of small talk per message.
    """
    _check(turns, fact_rate, probe_every, sentences)
    rng = random.Random(seed)
    pairs = [(owner, attribute) for owner in _OWNERS for attribute in _ATTRIBUTES]
    rng.shuffle(pairs)
    used: list[str] = []
    planted: list[tuple[int, str, str, str]] = []  # turn, question, value, statement
    messages: list[dict[str, str]] = []
    probes: list[Probe] = []
    low, high = sentences
    for turn in range(1, turns + 1):
        lines = [_line(rng, _USER_LINES) for _ in range(rng.randint(low, high))]
        fact = pairs and rng.random() < fact_rate
        if fact:
            owner, attribute = pairs.pop()
            value = _value(rng, attribute.kind, used)
            possessive = f"{owner}'s"
            statement = attribute.statement.format(owner=possessive, value=value)
            lead = rng.choice(_LEADS)
            sentence = lead + statement if lead else statement[0].upper() + statement[1:]
            lines.insert(rng.randint(0, len(lines)), sentence)
            question = attribute.question.format(owner=possessive)
            planted.append((turn, question, value, sentence))
        messages.append({"role": "user", "content": " ".join(lines)})
        reply = [_line(rng, _ASSISTANT_LINES) for _ in range(rng.randint(low, high))]
        if fact:
            reply.insert(0, rng.choice(_ACKS))
        messages.append({"role": "assistant", "content": " ".join(reply)})
        if probe_every and turn % probe_every == 0 and planted:
            when, question, value, sentence = planted[rng.randrange(len(planted))]
            probes.append(
                Probe(
                    after=len(messages),
                    question=question,
                    expect=(value,),
                    answer=sentence,
                    meta={"planted_turn": when, "age": turn - when},
                )
            )
    return Transcript(
        name=f"generated-{turns}t-seed{seed}",
        messages=tuple(messages),
        system=system,
        probes=tuple(probes),
        source=(
            f"generate(turns={turns}, seed={seed}, fact_rate={fact_rate}, "
            f"probe_every={probe_every}, sentences={tuple(sentences)}) [{GENERATOR_VERSION}]"
        ),
    )


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
            value = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}"
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
