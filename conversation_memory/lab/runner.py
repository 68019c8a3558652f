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
an LLM judge (:mod:`conversation_memory.lab.scoring`), and what the prepared
context carried of the probe's evidence is noted with it, needing no model
(:mod:`conversation_memory.lab.retention`).

The **baseline** sends the whole history every turn. In replay mode it needs
no database: its turn is the system prompt, every message so far and the
reply priming, counted message by message; a turn longer than the model's
window minus the reply reserve is not counted and its probes are not asked.
In live mode it is a conversation with ``truncate`` and no cap (the whole
history while it fits the window).

This module checks the arguments, runs every strategy × budget and the
baseline, and records the provenance; :mod:`~conversation_memory.lab.replay`
replays one run through the engine, :mod:`~conversation_memory.lab.baseline`
measures the full history, and :mod:`~conversation_memory.lab.measure` holds
what both measure with.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from conversation_memory import (
    DEFAULT_PROMPT,
    TRUNCATE,
    Embeddings,
    Strategy,
    counter_for,
    default_model,
    get_model,
)
from conversation_memory.errors import ConfigurationError
from conversation_memory.lab import testmodel
from conversation_memory.lab.baseline import run_baseline
from conversation_memory.lab.generate import generate
from conversation_memory.lab.measure import Lab, Progress
from conversation_memory.lab.replay import run_strategy
from conversation_memory.lab.results import BASELINE, Results, RunResult
from conversation_memory.lab.scoring import JUDGE_PROMPT, SCORING
from conversation_memory.lab.specs import load_strategy
from conversation_memory.lab.transcript import Transcript, request_points

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_STRATEGIES", "LAB_VERSION", "MODES", "run"]

LAB_VERSION = "2"
"""Changes whenever the same inputs would be measured differently (2: evidence retention;
sentences split around abbreviations, decimals and URLs)."""
MODES = ("replay", "live")
DEFAULT_STRATEGIES = ("truncate", "summary", "hierarchical")
DEFAULT_BUDGETS = (1000, 4000)


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
    embeddings: str | Embeddings | None = None,
    embedder: Callable[[Sequence[str], int | None], Sequence[Sequence[float]]] | None = None,
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
    ``embeddings`` names an embeddings model (or is an ``Embeddings``, its
    ``min_similarity`` say) the replayed memories embed every stored message
    with, through ``client``, so that the recalling strategies find earlier
    turns by meaning too; ``embedder`` is the model behind the
    lab's test server's embeddings route (``ChatServer(embedder=...)``; default:
    its hashed bag of words), only without a ``client``.
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
    settings = None
    if embeddings is not None:
        settings = embeddings if isinstance(embeddings, Embeddings) else Embeddings(embeddings)
    if embedder is not None and (client is not None or embeddings is None):
        raise ConfigurationError(
            "embedder= is the lab's test server's embeddings model: give it with "
            "embeddings='<model name>' and without client=",
            argument="embedder",
        )
    model = model or default_model()
    info = get_model(model)
    summary_model = summary_model or model
    judge_model = judge_model or model
    replayed = [t for t in items if t.messages]
    if not replayed:
        raise ConfigurationError("every transcript is empty: there is nothing to replay")
    started = time.perf_counter()
    with ExitStack() as stack:
        if client is None:
            server = stack.enter_context(testmodel.lab_server(model=model, embedder=embedder))
            client = server.client()
            stack.callback(client.close)
            backend = backend or "test"
        from conversation_memory.llm import LLM

        steps = sum(len(request_points(t.messages, live=mode == "live")) for t in replayed)
        lab = Lab(
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
            embeddings=(replace(settings, client=client, background=False) if settings else None),
        )
        if db is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="convmem-lab-"))
            db = Path(folder) / "lab.db"
        runs: list[RunResult] = []
        timing: dict[str, float] = {}
        for strategy in chosen:
            for cap in caps:
                began = time.perf_counter()
                runs.append(
                    run_strategy(lab, db, replayed, strategy, cap, label=f"{strategy.name}@{cap}")
                )
                timing[runs[-1].label] = round(time.perf_counter() - began, 3)
        if baseline:
            began = time.perf_counter()
            if mode == "replay":
                runs.append(run_baseline(lab, replayed))
            else:
                runs.append(run_strategy(lab, db, replayed, TRUNCATE, None, label=BASELINE))
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


# --- provenance -----------------------------------------------------------------------


def _meta(
    lab: Lab,
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
                "turns": len(lab.requests(t.messages)),
                "probes": len(t.probes),
                "sessions": len(t.sessions),
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
        "embeddings": lab.embeddings.model if lab.embeddings is not None else None,
        "transcripts": described,
        "skipped": [t.name for t in transcripts if not t.messages],
    }
