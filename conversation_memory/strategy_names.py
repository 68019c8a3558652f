"""Strategies by name: ``"truncate"``, ``"window:8"``, ``"summary+recall"`` and the rest.

:func:`as_strategy` accepts a strategy object, a bare function ``(state,
budget) -> Selection``, or a built-in's name with its parameters:

- ``truncate``; ``window`` or ``window:N``;
- ``summary`` or ``summary:high=H,low=L[,tokens=T]``;
- ``hierarchical`` or ``hierarchical:fanout=F[,high=H,low=L]``;
- ``recall`` (truncation plus recalled turns) and ``NAME+recall`` for any of
  the above, optionally ``+recall:share=S,k=K``, e.g. ``summary+recall``.

Its own floor, above the strategies it names (the recall wrapper among them).
Pure: no I/O.
"""

from __future__ import annotations

from conversation_memory.errors import ConfigurationError
from conversation_memory.recall import Recall
from conversation_memory.strategies import (
    TRUNCATE,
    FunctionStrategy,
    Hierarchical,
    Strategy,
    StrategyLike,
    Summarize,
    Window,
)

__all__ = ["as_strategy"]

_CHOICES = (
    "'truncate', 'window' or 'window:N' (N turns, at least 1), 'summary' or "
    "'summary:high=H,low=L', 'hierarchical' or 'hierarchical:fanout=F', 'recall' "
    "or any of them with '+recall' (e.g. 'summary+recall', 'recall:share=0.25,k=4')"
)
NAMES = ("truncate", "window", "window:N", "summary", "hierarchical", "recall", "NAME+recall")


def _by_name(text: str) -> Strategy:
    base, plus, recall = text.strip().partition("+")
    if plus:
        key, colon, arguments = recall.strip().lower().partition(":")
        if key != "recall" or "+" in arguments:
            raise ConfigurationError(
                f"unknown strategy {text!r}: only '+recall' may follow a strategy's name, "
                "e.g. 'summary+recall'",
                argument="strategy",
                choices=NAMES,
            )
        return _recall_from(text, _by_name(base), arguments if colon else "")
    key, colon, argument = text.strip().lower().partition(":")
    argument = argument.strip()
    if key == "truncate" and not colon:
        return TRUNCATE
    if key == "window":
        if not colon:
            return Window()
        if argument.isdigit() and int(argument) >= 1:
            return Window(turns=int(argument))
        # One message for 0, -1 and x alike, in the name's own terms (not the class's).
        raise ConfigurationError(
            f"strategy {text!r}: N in 'window:N' must be a whole number of turns, at least 1; "
            "e.g. 'window:8'",
            argument="strategy",
        )
    if key == "summary":
        return _summary_from(text, argument if colon else "")
    if key == "hierarchical":
        return _summary_from(text, argument if colon else "", hierarchical=True)
    if key == "recall":
        return _recall_from(text, TRUNCATE, argument if colon else "")
    raise ConfigurationError(
        f"unknown strategy {text!r}; choose {_CHOICES}, or pass a strategy object "
        "or a function (state, budget) -> Selection",
        argument="strategy",
        choices=NAMES,
    )


def _pairs(text: str, arguments: str, example: str) -> list[tuple[str, str]]:
    pairs = []
    for pair in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, value = pair.partition("=")
        if not equals:
            raise ConfigurationError(
                f"cannot read {pair!r} in strategy {text!r}; use e.g. {example!r}",
                argument="strategy",
            )
        pairs.append((key.strip().replace("-", "_"), value.strip()))
    return pairs


def _recall_from(text: str, base: Strategy, arguments: str) -> Strategy:
    options: dict[str, float | int] = {}
    for key, value in _pairs(text, arguments, "recall:share=0.25,k=4"):
        try:
            if key == "share":
                options["share"] = float(value)
                continue
            if key == "k":
                options["k"] = int(value)
                continue
        except ValueError:
            pass
        raise ConfigurationError(
            f"cannot read {key}={value} in strategy {text!r}; use e.g. 'recall:share=0.25,k=4'",
            argument="strategy",
        )
    return Recall(base=base, **options)  # type: ignore[arg-type]


def _summary_from(text: str, arguments: str, *, hierarchical: bool = False) -> Strategy:
    options: dict[str, float | int] = {}
    for pair in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        try:
            if key in ("high", "low") and equals:
                options[key] = float(value)
                continue
            if key in ("summary_tokens", "tokens") and equals:
                options["summary_tokens"] = int(value)
                continue
            if key == "fanout" and equals and hierarchical:
                options["fanout"] = int(value)
                continue
        except ValueError:
            pass
        raise ConfigurationError(
            f"cannot read {pair!r} in strategy {text!r}; use e.g. 'summary:high=0.9,low=0.6'",
            argument="strategy",
        )
    if hierarchical:
        return Hierarchical(**options)  # type: ignore[arg-type]
    return Summarize(**options)  # type: ignore[arg-type]


def as_strategy(strategy: StrategyLike) -> Strategy:
    """A :class:`Strategy` from a strategy object, a function, or a built-in's name."""
    if isinstance(strategy, str):
        return _by_name(strategy)
    if not isinstance(strategy, type):
        if callable(getattr(strategy, "select", None)) and isinstance(
            getattr(strategy, "name", None), str
        ):
            return strategy  # type: ignore[return-value]
        if callable(strategy):
            return FunctionStrategy(strategy)
    raise ConfigurationError(
        f"strategy must be a strategy object (name and select(state, budget)), a function "
        f"(state, budget) -> Selection, or one of {_CHOICES}; got {strategy!r}",
        argument="strategy",
    )
