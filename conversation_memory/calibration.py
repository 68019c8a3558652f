"""How a conversation learns the server's token count from ours (pure).

For a server whose tokenizer is not tiktoken's, the budget applies a
:class:`~conversation_memory.types.Correction` (``ours * factor + margin``).
It is learnt from observations, (our count, the server's count) of one
prompt: the ``usage.prompt_tokens`` of each reply, or what a caller tells
``calibrate()``. A context-length error's numbers are a claim about a
request the server did not serve: they size the one retry of that turn and
are never stored.

Until anything is learnt, the registry's initial correction for the model is
the prior (identity for OpenAI models; e.g. 1.25 for the local model's own
tokenizer). The store calls a :data:`~conversation_memory.store.log.Learn`
rule with the correction stored so far, inside the transaction that writes
the result, so two turns learning at once never lose an observation.
"""

from __future__ import annotations

from conversation_memory.store.log import Learn
from conversation_memory.store.values import Calibration
from conversation_memory.types import MAX_FACTOR, MIN_FACTOR, Correction

SPREAD = 2.0
"""How far apart the ratios (server's count to ours) of one conversation's prompts
plausibly lie. A correction more than this above an exact count is not a memory of
an earlier, denser prompt but stale or wrong, and the count replaces it."""
MOVE = 0.02
"""A reply changes the stored correction only when the factor moves by more than
this share (or the margin changes): an extra write per turn would cost an extra
fsync per turn."""


def next_correction(factor: float | None, counted: int, reported: int) -> tuple[float, int]:
    """The calibration after one observation: (factor, margin).

    The factor follows the observed ratio (an exponential average that never
    drops below the newest ratio, so one surprise is never averaged away); a
    server that disagrees with us at all also gets a margin. A factor more than
    :data:`SPREAD` times the observed ratio is replaced by it: one reply's exact
    count is enough to undo a wrong correction.
    """
    ratio = min(max(reported / counted, MIN_FACTOR), MAX_FACTOR)
    if factor is None or factor > SPREAD * ratio:
        new = ratio
    else:
        new = max(ratio, 0.7 * factor + 0.3 * ratio)
    exact = reported == counted and new == 1.0
    # The ratio differs between the messages of one prompt, so the margin grows
    # with the prompt: 16 tokens plus 2% of what the server counted.
    return new, 0 if exact else 16 + reported // 50


def known(stored: Correction | None, initial: Correction) -> Correction:
    """The correction in force: what was learnt, else the model's initial one."""
    return stored if stored is not None else initial


def learnt(known: Correction, counted: int, reported: int) -> Correction:
    """The correction one observation leads to from ``known`` (nothing is stored)."""
    prior = known.factor if known != Correction() else None
    return Correction(*next_correction(prior, counted, reported))


def from_reply(initial: Correction, counted: int, reported: int) -> Learn:
    """The rule a turn's commit applies to a reply's usage: store a correction that moved."""

    def learn(stored: Correction | None) -> Calibration | None:
        current = known(stored, initial)
        if current == Correction() and reported == counted:
            return None  # agrees with us and nothing learnt yet: nothing to write
        new = learnt(current, counted, reported)
        moved = current == Correction() or abs(new.factor - current.factor) > MOVE * current.factor
        if not moved and new.margin == current.margin:
            return None
        return Calibration(new.factor, new.margin, last_counted=counted, last_reported=reported)

    return learn


def told(initial: Correction, counted: int, reported: int) -> Learn:
    """The rule ``calibrate(counted=..., reported=...)`` applies: always store."""

    def learn(stored: Correction | None) -> Calibration:
        new = learnt(known(stored, initial), counted, reported)
        return Calibration(new.factor, new.margin, last_counted=counted, last_reported=reported)

    return learn


__all__ = ["SPREAD", "from_reply", "known", "learnt", "next_correction", "told"]
