"""The full-history baseline in replay mode: the whole history every turn, no database.

Its turn is the system prompt, every message so far and the reply priming,
counted message by message with the model's counter (tool definitions
added). A turn longer than the model's window minus the reply reserve is
not counted, and its probes are not asked (``probes_skipped``). A probe that
is asked has every message said so far in front of it, so all its evidence is
retained, raw. In live mode
the baseline is a replayed conversation instead (:mod:`.replay`, with
``truncate`` and no cap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conversation_memory import REPLY_PRIMING, budget_for
from conversation_memory.lab.measure import Lab, Tally, score
from conversation_memory.lab.results import BASELINE, RunResult
from conversation_memory.lab.retention import retained, whole_history
from conversation_memory.lab.transcript import Probe, Transcript, request_points

__all__ = ["run_baseline"]


def run_baseline(lab: Lab, transcripts: Sequence[Transcript]) -> RunResult:
    """The whole history every turn, counted message by message (replay mode)."""
    limit = budget_for(lab.model).limit
    tally = Tally()
    count = lab.counter.count_message
    for transcript in transcripts:
        requests = set(request_points(transcript.messages))
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
                        said=index + 1,
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
                said=len(transcript.messages),
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
    lab: Lab,
    history: list[dict[str, Any]],
    *,
    running: int,
    limit: int,
    probe: Probe,
    transcript: Transcript,
    turn: int,
    tally: Tally,
    said: int,
) -> None:
    """Ask ``probe`` with the whole history, if it fits (``said``: transcript messages in it)."""
    question = {"role": "user", "content": probe.question}
    tokens = running + lab.counter.count_message(question)
    if tokens > limit:
        tally.skipped += 1
        return
    score(
        lab,
        [*history, question],
        tokens=tokens,
        probe=probe,
        transcript=transcript,
        turn=turn,
        tally=tally,
        evidence=retained(probe, whole_history(said), lambda index: index),
    )
