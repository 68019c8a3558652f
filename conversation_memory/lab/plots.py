"""PNG plots of lab results, drawn with matplotlib's Agg backend (no display needed).

- ``tokens_per_turn.png``: prompt tokens sent at each turn, one panel per
  budget, a line per strategy (and the full-history baseline, dashed);
- ``cumulative_cost.png``: estimated USD so far (turns and summaries), same
  layout; cumulative tokens (turns and summaries) when the model has no price;
- ``retention_vs_tokens.png``: evidence retention against mean tokens sent per
  turn, one point per strategy × budget (only when probes named evidence);
- ``recall_vs_tokens.png``: recall against mean tokens sent per turn, the same
  way (only when there were probes).

matplotlib is an optional dependency (``pip install conversation-memory[plots]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

from conversation_memory.errors import ConfigurationError
from conversation_memory.lab.results import BASELINE, Results, RunResult

__all__ = ["write_plots"]

_DPI = 100
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def write_plots(results: Results, folder: str | Path) -> list[Path]:
    """Draw the plots into ``folder``; the paths written."""
    plt = _pyplot()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in results.runs if not r.baseline]
    baseline = results.baseline
    budgets = list(dict.fromkeys(r.budget for r in runs))
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    colours = {name: f"C{n % 10}" for n, name in enumerate(strategies)}
    title = _title(results)
    written = []

    def panels(name: str, ylabel: str, series: Any, heading: str) -> None:
        count = max(1, len(budgets))
        fig, axes = plt.subplots(1, count, figsize=(4.2 * count + 1, 3.8), squeeze=False)
        for ax, budget in zip(axes[0], budgets, strict=False):
            top = 0.0
            for r in runs:
                if r.budget == budget:
                    xs, ys = series(r)
                    ax.plot(xs, ys, label=r.strategy, color=colours[r.strategy], lw=1.2)
                    top = max([top, *ys])
            if baseline is not None:
                xs, ys = series(baseline)
                ax.plot(xs, ys, label=BASELINE, color="0.45", lw=1.0, ls="--")
                if ys and top and max(ys) > 1.6 * top:
                    # Keep the strategies readable: the baseline runs off the top.
                    ax.set_ylim(0, 1.6 * top)
                    ax.annotate(
                        f"{BASELINE} reaches {max(ys):,.{0 if max(ys) >= 100 else 3}f}",
                        xy=(0.98, 0.97),
                        xycoords="axes fraction",
                        ha="right",
                        va="top",
                        fontsize=7,
                        color="0.35",
                    )
            ax.set_title(f"budget {budget:,}", fontsize=10)
            ax.set_xlabel("turn")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{heading}\n{title}", fontsize=10)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=_DPI)
        plt.close(fig)
        written.append(path)

    panels("tokens_per_turn.png", "prompt tokens sent", _tokens, "Tokens sent per turn")
    priced = all(r.cost is not None for r in results.runs)
    if priced:
        panels("cumulative_cost.png", "USD (estimated)", _cost, "Cumulative cost")
    else:
        panels(
            "cumulative_cost.png",
            "tokens (no price known)",
            _cumulative_tokens,
            "Cumulative tokens: turns and summaries",
        )
    if any(r.evidence for r in results.runs):
        written.append(
            _scatter(
                plt,
                results,
                out / "retention_vs_tokens.png",
                colours,
                budgets,
                figure="retention",
            )
        )
    if any(r.probes for r in results.runs):
        written.append(
            _scatter(plt, results, out / "recall_vs_tokens.png", colours, budgets, figure="recall")
        )
    return written


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError(
            "plots need matplotlib: pip install 'conversation-memory[plots]' (or pass "
            "plots=False / --no-plots)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # Fixed metadata, so the same results give the same bytes.
    matplotlib.rcParams["svg.hashsalt"] = "convmem-lab"
    return plt


def _title(results: Results) -> str:
    meta = results.meta
    parts = [
        f"model {meta.get('model')}",
        f"{meta.get('mode')} mode",
        f"{meta.get('backend')} backend",
    ]
    return " · ".join(parts)


def _tokens(run: RunResult) -> tuple[list[int], list[float]]:
    xs = [n for n, t in enumerate(run.tokens, start=1) if t is not None]
    return xs, [float(t) for t in run.tokens if t is not None]


def _cost(run: RunResult) -> tuple[list[int], list[float]]:
    costs = [c or 0.0 for c, t in zip(run.costs, run.tokens, strict=True) if t is not None]
    xs = [n for n, t in enumerate(run.tokens, start=1) if t is not None]
    return xs, list(accumulate(costs))


def _cumulative_tokens(run: RunResult) -> tuple[list[int], list[float]]:
    xs, ys = _tokens(run)
    total = list(accumulate(ys))
    if total and run.summary_prompt_tokens:
        # Summaries are not tied to turns in the saved figures: spread them evenly.
        extra = (run.summary_prompt_tokens + run.summary_completion_tokens) / len(total)
        total = [value + extra * n for n, value in enumerate(total, start=1)]
    return xs, total


def _scatter(
    plt: Any,
    results: Results,
    path: Path,
    colours: dict[str, str],
    budgets: Sequence[Any],
    *,
    figure: str,
) -> Path:
    """``figure`` (``"retention"`` or ``"recall"``) against mean tokens sent per turn."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {budget: _MARKERS[n % len(_MARKERS)] for n, budget in enumerate(budgets)}
    for r in results.runs:
        value = getattr(r, figure)
        if value is None or r.tokens_mean is None:
            continue
        if r.baseline:
            ax.scatter(r.tokens_mean, value, marker="*", s=160, color="0.3", label=BASELINE)
        else:
            ax.scatter(
                r.tokens_mean,
                value,
                marker=markers[r.budget],
                s=60,
                color=colours[r.strategy],
                label=f"{r.strategy} @ {r.budget:,}",
            )
        ax.annotate(
            f"{value:.1%}",
            (r.tokens_mean, value),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=7,
        )
    ax.set_xlabel("mean prompt tokens sent per turn")
    ax.set_ylabel(_AXES[figure])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{_TITLES[figure]}\n{_title(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


_AXES = {
    "retention": "evidence retained (share)",
    "recall": "recall (probes answered right)",
}
_TITLES = {
    "retention": "Evidence retention against tokens",
    "recall": "Recall against tokens",
}
