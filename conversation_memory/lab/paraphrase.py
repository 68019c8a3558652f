"""The other words the generator asks its questions in (``generate(paraphrase=True)``).

A probe asked in the fact's own words ("What is my sister's locker code?"
after "my sister's locker code is 4821") can be answered by matching words:
by a reader that looks for the sentence sharing most of them, or by a
lexical search over the archive. People don't ask like that. Here every
fact has a question that shares **no content word**
(:func:`~conversation_memory.lab.text.content_words`) with the message that
states it, nor with the small talk around it or the session header:

- the person is named another way: a synonym ("my boss" for "my manager"),
  or an indirect reference ("my mum's brother" for "my uncle");
- the attribute is asked with synonyms ("Which hue does ... prefer?" for a
  favourite colour; "What name did ... give the feline?" for a cat);
- an event said to have happened "yesterday" is asked for by its date ("On
  what date did ... relocate?"), which has to be worked out from the date of
  the session it was said in.

The tests check the disjointness on generated conversations; a new entry
here must keep it (no word of the small talk, the acknowledgements or the
session headers either).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ATTRIBUTE_QUESTIONS", "EVENTS", "OWNER_REFERENCES"]

OWNER_REFERENCES: Mapping[str, str] = {
    "my sister": "my female sibling",
    "my brother": "my male sibling",
    "my neighbour": "my next-door resident",
    "my manager": "my boss",
    "my dentist": "my tooth doctor",
    "my landlord": "the person I rent from",
    "my cousin": "the child of my aunt",
    "my coach": "my trainer",
    "my grandmother": "my granny",
    "my best friend": "my closest pal",
    "my accountant": "the person doing my taxes",
    "my piano teacher": "my keyboard tutor",
    "my flatmate": "the person sharing my flat",
    "my uncle": "my mum's brother",
    "my aunt": "my dad's sister",
}
"""Each person the generator's facts are about, and how a paraphrased question names them."""

ATTRIBUTE_QUESTIONS: Mapping[str, str] = {
    "code": "Which digits open the gym cabinet of {who}?",
    "city": "Where was {who} raised?",
    "pet": "What name did {who} give the feline?",
    "colour": "Which hue does {who} prefer?",
    "car": "Which brand of vehicle does {who} drive?",
    "date": "On what date was {who} born?",
    "flight": "What is the code of the plane {who} is boarding?",
    "book": "Which novel does {who} treasure above all others?",
    "room": "Behind which door is {who} staying at the inn?",
}
"""A question in other words for each kind of attribute; ``{who}`` is the person."""

EVENTS: tuple[tuple[str, str, str], ...] = (
    ("ran a marathon", "run a marathon", "finish the 42-kilometre race"),
    ("started a new job", "start the new job", "join the current employer"),
    ("moved house", "move house", "relocate"),
    ("got engaged", "get engaged", "accept a marriage proposal"),
    ("adopted a puppy", "adopt the puppy", "welcome a young dog"),
    ("had knee surgery", "have knee surgery", "undergo an operation"),
)
"""Things that happened "yesterday": (as said, as asked directly, as asked in other words).
The question is "On what date did {who} {asked}?"."""
