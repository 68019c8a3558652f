"""What a conversation's model calls cost: each call as its usage row recorded it, and
the totals (tokens, latency, estimated cost from the registry's list prices)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from conversation_memory.errors import ConfigurationError
from conversation_memory.registry import get_model
from conversation_memory.store.values import UsageRecord


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """What a conversation's model calls cost so far."""

    calls: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    summary_calls: int
    latency_ms: float
    cost: float | None
    """Estimated USD from the registry's list prices (None if a model has no price)."""

    @classmethod
    def of(cls, calls: Sequence[Call]) -> UsageTotals:
        cost: float | None = 0.0
        for call in calls:
            cost = None if cost is None or call.cost is None else cost + call.cost
        return cls(
            calls=len(calls),
            failed=sum(call.error is not None for call in calls),
            prompt_tokens=sum(call.prompt_tokens for call in calls),
            completion_tokens=sum(call.completion_tokens for call in calls),
            summary_calls=sum(call.kind == "summary" for call in calls),
            latency_ms=sum(call.latency_ms or 0.0 for call in calls),
            cost=cost,
        )


@dataclass(frozen=True, slots=True)
class Call:
    """One model call of a conversation, as its usage row recorded it."""

    kind: str
    """``chat`` for a turn, ``summary`` for a compaction."""
    model: str
    position: int | None
    """Position of the reply it stored (chat calls that stored one)."""
    prompt_tokens: int
    """As the server reported it, else as we counted it."""
    completion_tokens: int
    latency_ms: float | None
    finish_reason: str | None
    error: str | None
    created_at: datetime
    cost: float | None
    """Estimated USD from the registry's list prices (None if the model has no price)."""


def call_of(record: UsageRecord) -> Call:
    """A usage row as a :class:`Call`, priced from the registry."""
    prompt = record.prompt_tokens
    prompt_tokens = prompt if prompt is not None else (record.counted_prompt_tokens or 0)
    completion = record.completion_tokens or 0
    try:
        cost = get_model(record.model).cost(prompt_tokens, completion)
    except ConfigurationError:
        cost = None
    assert record.created_at is not None
    return Call(
        kind=record.kind,
        model=record.model,
        position=record.position,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        latency_ms=record.latency_ms,
        finish_reason=record.finish_reason,
        error=record.error,
        created_at=record.created_at,
        cost=cost,
    )


__all__ = ["Call", "UsageTotals", "call_of"]
