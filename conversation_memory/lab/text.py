"""Plain-text rules the lab reads conversations with: sentences, content words, scoring form.

The stand-in reader and summarizer (:mod:`~conversation_memory.lab.testmodel`)
work sentence by sentence, and probes are scored by keywords, so both depend
on how real text is cut up:

- :func:`sentences` ends a sentence at ``.``, ``!`` or ``?`` followed by
  space (closing quotes and brackets stay with it) and at every line break.
  A full stop is not an end after a title or a Latin abbreviation ("Dr.",
  "e.g.", "vs."), after an initial ("J. R. R. Tolkien"), or after "No."
  before a number; after "etc.", "a.m." and other dotted abbreviations it is
  an end only when the next word starts with a capital letter. Decimals
  ("3.5"), times ("10.30") and URLs ("https://example.com/a.b?c=1") have no
  space after their dots and never split.
- :func:`content_words` is what two texts must share to be about the same
  thing: casefolded words of two or more letters, without the commonest
  function words.
- :func:`normalize` is the form answers are scored in: casefolded, with
  punctuation turned into spaces and digit-group separators dropped
  ("4,821" is "4821", "mint-green" is "mint green").
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["STOP_WORDS", "contains", "content_words", "normalize", "sentences"]

STOP_WORDS = frozenset((
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "been", "but", "by", "can", "could", "did", "do", "does", "for", "from", "had",
    "has", "have", "he", "her", "him", "his", "how", "i", "if", "in", "into", "is", "it",
    "its", "just", "me", "my", "no", "not", "now", "of", "on", "or", "our", "she", "so",
    "some", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this",
    "to", "was", "we", "were", "what", "when", "where", "which", "who", "why", "will",
    "with", "would", "you", "your",
))  # fmt: skip
"""Words too common to tell one sentence from another."""

_NEVER_ENDS = frozenset((
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "vs", "cf", "e.g", "i.e",
    "eg", "ie", "viz", "approx", "ca", "fig", "figs", "gen", "capt", "col", "lt", "sgt",
    "rev", "hon", "dept", "univ", "ave", "incl", "esp", "resp",
))  # fmt: skip
"""Abbreviations always followed by more of the same sentence (titles, "e.g.")."""
_BEFORE_NUMBERS = frozenset(("no", "nos", "vol", "p", "pp", "ch", "sec", "art", "nr"))
"""Abbreviations that stand before a number ("No. 5", "p. 12")."""
_MAY_END = frozenset(("etc", "al", "inc", "ltd", "co", "corp", "jan", "feb", "aug", "sept"))
"""Abbreviations that end a sentence only if a capitalized word follows."""

_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*[ \t\f\v]+|\s*\n\s*")
_TOKEN_BEFORE = re.compile(r"(\S+)$")
_WORD = re.compile(r"[^\W_]+")
_SEPARATOR = re.compile(r"(?<=\d)[,.\u202f\u00a0'](?=\d{3}(?!\d))")
_NOT_WORD = re.compile(r"[\W_]+")


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences (stripped, none empty); see the module docstring."""
    out: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if "\n" not in match.group() and not _ends(text, match):
            continue
        piece = text[start : match.end()].strip()
        if piece:
            out.append(piece)
        start = match.end()
    rest = text[start:].strip()
    if rest:
        out.append(rest)
    return out


def _ends(text: str, match: re.Match[str]) -> bool:
    """Whether the punctuation at ``match`` ends a sentence (a full stop may not)."""
    marks = match.group().rstrip()
    if not marks.startswith(".") or marks.startswith(".."):
        return True  # "!", "?" and an ellipsis always end
    before = _TOKEN_BEFORE.search(text, 0, match.start())
    if before is None:
        return True
    token = before.group(1).lstrip("\"'(\u201c\u2018[").casefold()
    following = text[match.end() : match.end() + 1]
    if token in _NEVER_ENDS:
        return False
    if token in _BEFORE_NUMBERS and following.isdigit():
        return False
    if len(token) == 1 and token.isalpha() and before.group(1)[-1].isupper():
        return False  # an initial: "J. Smith"
    if token in _MAY_END or re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", token):
        return following.isupper()  # "etc. Then", "a.m. We", "U.S. The"
    return True


def content_words(text: str) -> set[str]:
    """The casefolded words of ``text`` that carry its meaning (no stop words, no single
    letters)."""
    return {w for w in _WORD.findall(text.casefold()) if len(w) > 1 and w not in STOP_WORDS}


def normalize(text: str) -> str:
    """``text`` in the form answers are compared in: casefolded, punctuation as single
    spaces, digit groups joined ("4,821" -> "4821")."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    joined = _SEPARATOR.sub("", folded)
    return " ".join(_NOT_WORD.sub(" ", joined).split())


def contains(text: str, phrase: str) -> bool:
    """Whether ``phrase`` appears in ``text`` as whole words, ignoring case and punctuation."""
    wanted = normalize(phrase)
    if not wanted:
        return False
    return re.search(r"(?<!\w)" + re.escape(wanted) + r"(?!\w)", normalize(text)) is not None
