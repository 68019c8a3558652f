"""What a lab run measured, per strategy × budget, and how it is saved.

Every figure except wall time is a pure function of the inputs, the
strategies, the budgets and the model's replies, so a rerun against the
deterministic test server reproduces ``results.json`` and the CSV files byte
for byte. Wall time lives apart: :attr:`Results.timing`, written to
``timing.json`` and shown in the terminal table, never in ``results.json``
(``Results.to_dict(timing=True)`` adds it under a ``"timing"`` key when wanted).

Token figures are counted with the model's tokenizer (tiktoken for OpenAI
models), the count the budget itself uses; costs are estimates from the
registry's list prices (None when the model has no price).

The memory figures are **evidence retention** (the share of the probes'
evidence messages that the context carried when they were asked, raw,
retrieved or in a summary; :mod:`~conversation_memory.lab.retention`), which
needs no model and is the headline, and **recall** (the share of probes the
model answered right). Both are shown with one decimal and their counts
("0.4% (6/1,532)"), so that close results stay apart.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.lab.retention import WAYS, tally

__all__ = ["BASELINE", "ProbeResult", "Results", "RunResult"]

BASELINE = "full history"
"""The strategy name of the baseline run: every message, while it fits the model's window."""

METRICS = (
    "strategy",
    "budget",
    "limit",
    "turns",
    "tokens_total",
    "tokens_mean",
    "tokens_p95",
    "tokens_max",
    "utilization",
    "evidence",
    "evidence_retained",
    "retention",
    "retained_raw",
    "retained_retrieved",
    "retained_summary",
    "summary_calls",
    "summary_failures",
    "summary_prompt_tokens",
    "summary_completion_tokens",
    "cost_usd",
    "probes",
    "correct",
    "recall",
    "over_window_turns",
    "error",
)
"""Columns of ``results.csv`` (one row per strategy × budget, the baseline last)."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe question as a strategy's context answered it."""

    transcript: str
    turn: int
    """Turns of that transcript replayed before it was asked."""
    question: str
    expected: str
    answer: str
    correct: bool
    tokens: int
    """Prompt tokens of the probe request (not part of the turn figures)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    """Why no answer came (the call failed), if so."""
    evidence: tuple[int, ...] = ()
    """The probe's evidence messages (transcript indexes) that were measured."""
    retained: tuple[str | None, ...] = ()
    """For each of ``evidence``: how the context carried it (``"raw"``, ``"retrieved"``,
    ``"summary"``), or None: lost."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """One strategy at one budget, over every transcript (turns one after another)."""

    strategy: str
    budget: int | None
    """The prompt cap given; None for the baseline (the model's window)."""
    limit: int
    """Prompt tokens allowed per request: the cap, or the window minus the reply reserve."""
    tokens: tuple[int | None, ...]
    """Prompt tokens sent at each turn (None: the baseline did not fit the window)."""
    costs: tuple[float | None, ...]
    """Estimated USD of each turn: its request plus the summaries made right after it."""
    summary_calls: int = 0
    summary_failures: int = 0
    summary_prompt_tokens: int = 0
    summary_completion_tokens: int = 0
    summary_errors: tuple[str, ...] = ()
    """The distinct reasons summaries failed (at most five), for the record."""
    probes: tuple[ProbeResult, ...] = ()
    probes_skipped: int = 0
    """Probes not asked: the baseline's history no longer fit the window."""
    error: str | None = None
    """Why the run stopped early (its figures cover the turns before)."""

    @property
    def label(self) -> str:
        return self.strategy if self.budget is None else f"{self.strategy}@{self.budget}"

    @property
    def baseline(self) -> bool:
        return self.strategy == BASELINE

    @property
    def turns(self) -> int:
        return len(self.tokens)

    @property
    def sent(self) -> list[int]:
        """The per-turn token counts of the turns that were sent."""
        return [t for t in self.tokens if t is not None]

    @property
    def over_window_turns(self) -> int:
        return sum(t is None for t in self.tokens)

    @property
    def tokens_total(self) -> int:
        return sum(self.sent)

    @property
    def tokens_mean(self) -> float | None:
        sent = self.sent
        return round(sum(sent) / len(sent), 1) if sent else None

    @property
    def tokens_p95(self) -> int | None:
        """95th percentile (nearest rank)."""
        sent = sorted(self.sent)
        return sent[math.ceil(0.95 * len(sent)) - 1] if sent else None

    @property
    def tokens_max(self) -> int | None:
        return max(self.sent, default=None)

    @property
    def utilization(self) -> float | None:
        """Mean share of the limit used per turn."""
        sent = self.sent
        return round(sum(sent) / len(sent) / self.limit, 4) if sent else None

    @property
    def cost(self) -> float | None:
        """Estimated USD of the turns sent and the summaries (probes excluded)."""
        if any(c is None for c, t in zip(self.costs, self.tokens, strict=True) if t is not None):
            return None
        return round(sum(c for c in self.costs if c is not None), 8)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.probes)

    @property
    def recall(self) -> float | None:
        """Share of the probes asked that were answered right (None: no probes)."""
        return round(self.correct / len(self.probes), 4) if self.probes else None

    @property
    def evidence(self) -> int:
        """Evidence messages of the probes asked (each probe's own, counted per probe)."""
        return sum(len(p.evidence) for p in self.probes)

    @property
    def retained_by(self) -> Mapping[str, int]:
        """Evidence messages retained each way (:data:`~.retention.WAYS`) and ``"lost"``."""
        return tally(way for p in self.probes for way in p.retained)

    @property
    def evidence_retained(self) -> int:
        return sum(way is not None for p in self.probes for way in p.retained)

    @property
    def retention(self) -> float | None:
        """Share of the evidence messages that the contexts carried (None: no evidence)."""
        return round(self.evidence_retained / self.evidence, 4) if self.evidence else None

    @property
    def retention_shown(self) -> str:
        """Retention as tables print it: ``"62.5% (10/16)"``, or ``"n/a"``."""
        return percent(self.evidence_retained, self.evidence)

    @property
    def recall_shown(self) -> str:
        """Recall as tables print it: ``"5.0% (1/20)"``, or ``"n/a"``."""
        return percent(self.correct, len(self.probes))

    def metrics(self) -> dict[str, Any]:
        """The summary figures, keyed as in :data:`METRICS`."""
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "limit": self.limit,
            "turns": self.turns,
            "tokens_total": self.tokens_total,
            "tokens_mean": self.tokens_mean,
            "tokens_p95": self.tokens_p95,
            "tokens_max": self.tokens_max,
            "utilization": self.utilization,
            "evidence": self.evidence,
            "evidence_retained": self.evidence_retained,
            "retention": self.retention,
            **{f"retained_{way}": count for way, count in self.retained_by.items() if way in WAYS},
            "summary_calls": self.summary_calls,
            "summary_failures": self.summary_failures,
            "summary_prompt_tokens": self.summary_prompt_tokens,
            "summary_completion_tokens": self.summary_completion_tokens,
            "cost_usd": self.cost,
            "probes": len(self.probes),
            "correct": self.correct,
            "recall": self.recall,
            "over_window_turns": self.over_window_turns,
            "error": self.error,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics(),
            "summary_errors": list(self.summary_errors),
            "probes_skipped": self.probes_skipped,
            "per_turn": {
                "tokens": list(self.tokens),
                "cost_usd": [None if c is None else round(c, 10) for c in self.costs],
            },
            "probe_results": [asdict(p) for p in self.probes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        per_turn = data.get("per_turn") or {}
        return cls(
            strategy=data["strategy"],
            budget=data.get("budget"),
            limit=data["limit"],
            tokens=tuple(per_turn.get("tokens") or ()),
            costs=tuple(per_turn.get("cost_usd") or ()),
            summary_calls=data.get("summary_calls", 0),
            summary_failures=data.get("summary_failures", 0),
            summary_prompt_tokens=data.get("summary_prompt_tokens", 0),
            summary_completion_tokens=data.get("summary_completion_tokens", 0),
            summary_errors=tuple(data.get("summary_errors") or ()),
            probes=tuple(_probe(p) for p in data.get("probe_results") or ()),
            probes_skipped=data.get("probes_skipped", 0),
            error=data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class Results:
    """Everything one lab run measured.

    ``runs`` holds one :class:`RunResult` per strategy × budget, in the order
    given (strategies outer), then the baseline if it was run. ``meta`` says
    what produced them (library, model, backend, prompt versions, inputs).
    ``timing`` holds wall-clock seconds per run label and ``"total"``; it is
    kept out of :meth:`to_dict` / ``results.json`` so reruns compare equal.
    """

    runs: tuple[RunResult, ...]
    meta: Mapping[str, Any]
    timing: Mapping[str, float] = field(default_factory=dict)

    def run(self, strategy: str, budget: int | None = None) -> RunResult:
        """The run of ``strategy`` (by name) at ``budget`` (None: the baseline)."""
        for each in self.runs:
            if each.strategy == strategy and each.budget == budget:
                return each
        known = ", ".join(each.label for each in self.runs)
        raise ConfigurationError(f"no run {strategy!r} at budget {budget}; the runs are {known}")

    @property
    def baseline(self) -> RunResult | None:
        return next((each for each in self.runs if each.baseline), None)

    def to_dict(self, *, timing: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"meta": dict(self.meta), "runs": [r.to_dict() for r in self.runs]}
        if timing:
            data["timing"] = dict(self.timing)
        return data

    def to_json(self, *, timing: bool = False) -> str:
        """Indented JSON, with lists of plain values (the per-turn series) on one line."""
        return _dumps(self.to_dict(timing=timing)) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Results:
        return cls(
            runs=tuple(RunResult.from_dict(r) for r in data["runs"]),
            meta=data.get("meta") or {},
            timing=data.get("timing") or {},
        )

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Results saved by :meth:`write` (``results.json``, plus ``timing.json`` beside it)."""
        file = Path(path)
        if file.is_dir():
            file = file / "results.json"
        data = json.loads(file.read_text(encoding="utf-8"))
        timing_file = file.with_name("timing.json")
        if timing_file.exists():
            data["timing"] = json.loads(timing_file.read_text(encoding="utf-8")).get("runs", {})
        return cls.from_dict(data)

    def to_csv(self) -> str:
        """One row per run with the :data:`METRICS` columns."""
        return _csv(METRICS, [r.metrics() for r in self.runs])

    def turns_csv(self) -> str:
        """One row per run and turn: ``strategy, budget, turn, tokens, cost_usd``."""
        rows = [
            {
                "strategy": r.strategy,
                "budget": r.budget,
                "turn": n,
                "tokens": tokens,
                "cost_usd": None if cost is None else round(cost, 10),
            }
            for r in self.runs
            for n, (tokens, cost) in enumerate(zip(r.tokens, r.costs, strict=True), start=1)
        ]
        return _csv(("strategy", "budget", "turn", "tokens", "cost_usd"), rows)

    def to_markdown(self) -> str:
        """A Markdown table of the main figures (wall time left out: it is not reproducible)."""
        head = (
            "| strategy | budget | tokens/turn (mean) | p95 | total tokens | evidence retained "
            "| summarizer calls (tokens) | est. cost | recall |"
        )
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.runs:
            m = r.metrics()
            cost = "n/a" if r.cost is None else f"${r.cost:.4f}"
            budget = f"{r.budget:,}" if r.budget is not None else f"window ({r.limit:,})"
            summaries = (
                f"{r.summary_calls} ({r.summary_prompt_tokens + r.summary_completion_tokens:,})"
            )
            mean = "n/a" if m["tokens_mean"] is None else f"{m['tokens_mean']:,.0f}"
            p95 = "n/a" if m["tokens_p95"] is None else f"{m['tokens_p95']:,}"
            name = r.strategy + (" (stopped early)" if r.error else "")
            lines.append(
                f"| {name} | {budget} | {mean} | {p95} | {r.tokens_total:,} | "
                f"{r.retention_shown} | {summaries} | {cost} | {r.recall_shown} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path, *, plots: bool = True) -> list[Path]:
        """Write results.json/.csv/.md, turns.csv, timing.json and (with matplotlib) PNGs."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "results.json": self.to_json(),
            "results.csv": self.to_csv(),
            "results.md": self.to_markdown(),
            "turns.csv": self.turns_csv(),
            "timing.json": json.dumps(
                {"note": "wall-clock seconds; not part of results.json", "runs": self.timing},
                indent=2,
            )
            + "\n",
        }
        written = []
        for name, text in files.items():
            path = folder / name
            path.write_text(text, encoding="utf-8", newline="")
            written.append(path)
        if plots:
            from conversation_memory.lab.plots import write_plots

            written.extend(write_plots(self, folder))
        return written


def percent(part: int, whole: int) -> str:
    """``part / whole`` with one decimal and the counts: ``"0.4% (6/1,532)"``."""
    if not whole:
        return "n/a"
    return f"{100 * part / whole:.1f}% ({part:,}/{whole:,})"


def _probe(data: Mapping[str, Any]) -> ProbeResult:
    fields = dict(data)
    fields["evidence"] = tuple(fields.get("evidence") or ())
    fields["retained"] = tuple(fields.get("retained") or ())
    return ProbeResult(**fields)


def _dumps(value: Any, indent: str = "") -> str:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list | tuple) and any(isinstance(v, dict | list | tuple) for v in value):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return buffer.getvalue()
