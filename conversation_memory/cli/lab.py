"""``convmem lab``: compare memory strategies on transcripts, in a table and in plots.

Formatting only: the replay, the metrics and the plots are
:mod:`conversation_memory.lab`'s. Which model answers (summaries and probes,
and replies in live mode): ``--backend test`` is the lab's deterministic
model on an in-process test server (the default when neither
``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` is set), ``local`` the local
SmolLM2 model, ``openai`` the server the environment (or ``--base-url``)
names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.markup import escape
from rich.table import Table

from conversation_memory.cli._app import (
    Integer,
    Number,
    command,
    console,
    json_option,
    local_client,
    print_json,
    print_view,
)
from conversation_memory.errors import ConfigurationError
from conversation_memory.llm import server_configured

if TYPE_CHECKING:
    from conversation_memory.lab import Results

BACKENDS = ("test", "local", "openai")


def _sentences(value: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise click.BadParameter(f"expected MIN-MAX such as 1-4, got {value!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise click.BadParameter(f"expected 1 <= MIN <= MAX, got {value!r}")
    return pair


@command(
    "lab",
    db_help="Keep the replayed conversations in this database (user 'lab') for "
    "`convmem show`; default: a temporary file, removed afterwards.",
)
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--generate",
    "-g",
    "use_generator",
    is_flag=True,
    help="Replay a generated conversation with planted facts and probes (the default "
    "when no FILES are given; with FILES, replayed after them).",
)
@click.option(
    "--turns", type=Integer(min=1), default=200, show_default=True,
    help="Generated conversation: user/assistant exchanges.",
)  # fmt: skip
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Generated conversation: seed."
)
@click.option(
    "--fact-rate", type=Number(0, 1), default=0.15, show_default=True,
    help="Generated conversation: share of user turns that plant a fact.",
)  # fmt: skip
@click.option(
    "--probe-every", type=Integer(min=0), default=10, show_default=True,
    help="Generated conversation: a probe question every N turns (0: none).",
)  # fmt: skip
@click.option(
    "--sentences", default="1-4", show_default=True, metavar="MIN-MAX",
    help="Generated conversation: sentences of small talk per message.",
)  # fmt: skip
@click.option(
    "--sessions", type=Integer(min=1), default=1, show_default=True,
    help="Generated conversation: dated sessions, days apart, between two named speakers "
    "(facts of 'yesterday' are asked for by date).",
)  # fmt: skip
@click.option(
    "--paraphrase",
    is_flag=True,
    help="Generated conversation: ask every probe in other words than its fact "
    "(synonyms, indirect references, dates to work out), so that matching words finds "
    "nothing.",
)
@click.option(
    "--final-probes", type=Integer(min=0), default=0, show_default=True,
    help="Generated conversation: probes asked after the last message, about facts of "
    "earlier sessions.",
)  # fmt: skip
@click.option(
    "--strategy",
    "-s",
    "strategies",
    multiple=True,
    metavar="SPEC",
    help="A strategy to compare; repeat for several (default: truncate, summary, "
    "hierarchical). Built-in names take parameters (summary:high=0.9,low=0.6, window:8, "
    "hierarchical:fanout=4, recall, summary+recall); your own: package.module:Name or "
    "path/to/file.py:Name (an object, a class, or a function (state, budget) -> Selection).",
)
@click.option(
    "--budget",
    "-b",
    "budgets",
    multiple=True,
    type=Integer(min=16),
    metavar="TOKENS",
    help="A prompt budget; repeat for several (default: 1000 and 4000).",
)
@click.option(
    "--mode",
    type=click.Choice(["replay", "live"]),
    default="replay",
    show_default=True,
    help="replay keeps the transcript's replies (the model only summarizes and answers "
    "probes); live sends the user messages and stores the model's replies.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Who answers: test (deterministic, offline; the default without "
    "OPENAI_API_KEY/OPENAI_BASE_URL), local (SmolLM2 on this machine), openai (the "
    "environment's server, or --base-url).",
)
@click.option("--base-url", default=None, metavar="URL", help="An OpenAI-compatible server.")
@click.option(
    "--model",
    "-m",
    default=None,
    help="Model that counts, prices and answers (default: CONVMEM_MODEL or gpt-4o-mini; "
    "the local model for --backend local).",
)
@click.option("--summary-model", default=None, help="Model that summarizes (default: --model).")
@click.option(
    "--judge",
    is_flag=True,
    help="Score probe answers with an LLM judge (a pinned, versioned prompt) instead of "
    "expected keywords/regex.",
)
@click.option("--judge-model", default=None, help="Model that judges (default: --model).")
@click.option("--no-baseline", is_flag=True, help="Skip the full-history baseline.")
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Write results.json, results.csv, results.md, turns.csv, timing.json and PNG plots.",
)
@click.option("--no-plots", is_flag=True, help="With --out: write no PNG plots.")
@json_option
def lab_command(
    db: str | None,
    files: tuple[Path, ...],
    use_generator: bool,
    turns: int,
    seed: int,
    fact_rate: float,
    probe_every: int,
    sentences: str,
    sessions: int,
    paraphrase: bool,
    final_probes: int,
    strategies: tuple[str, ...],
    budgets: tuple[int, ...],
    mode: str,
    backend: str | None,
    base_url: str | None,
    model: str | None,
    summary_model: str | None,
    judge: bool,
    judge_model: str | None,
    no_baseline: bool,
    out: Path | None,
    no_plots: bool,
    as_json: bool,
    debug: bool,
) -> None:
    """Replay conversations through memory strategies and compare what each costs and forgets.

    Each strategy × budget replays every transcript in a conversation of its
    own. Per turn it measures the prompt tokens sent; per run, their mean,
    95th percentile and total, summarizer calls and tokens, estimated cost,
    budget use, wall time, evidence retention (the share of the messages that
    answer the probes which the context still carried when they were asked:
    raw or in a summary; no model needed) and recall (the share of probe
    questions answered right from that strategy's context). A full-history
    baseline is measured too.

    FILES are OpenAI-format JSONL (`convmem export` files, one message per
    line, {"messages": [...]} or {"sessions": [{"date", "messages"}]} per
    line) or ShareGPT JSON; any conversation may carry "probes": [{"question",
    "expect", "regex", "after", "evidence"}]. Without FILES a conversation is
    generated (--turns, --seed, --fact-rate, --probe-every, --sentences,
    --sessions, --paraphrase), with facts planted in small talk and probes
    asking for them later.

    The default backend answers deterministically and offline: a reader that
    answers only with a sentence found in the request (so recall measures
    what the context kept) and an extractive, size-capped summarizer. Same
    seed, same numbers: results.json and the CSV files are identical between
    runs; wall time goes to timing.json only (and under "timing" with --json).

    --db keeps the replayed conversations (user "lab") for `convmem show`;
    by default they go to a temporary file, and CONVMEM_DB is not used.

    \b
    Example:
      convmem lab -s truncate -s summary -s mystrategies.py:KeepFacts -b 600 -b 2000 -o out/
    """
    from conversation_memory import lab

    transcripts = list(lab.read_transcripts(files)) if files else []
    if use_generator or not files:
        transcripts.append(
            lab.generate(
                turns,
                seed=seed,
                fact_rate=fact_rate,
                probe_every=probe_every,
                sentences=_sentences(sentences),
                sessions=sessions,
                paraphrase=paraphrase,
                final_probes=final_probes,
            )
        )
    chosen = backend or ("openai" if base_url or server_configured() else "test")
    if base_url and chosen != "openai":
        raise ConfigurationError(f"--base-url goes with --backend openai, not {chosen}")
    err = console(stderr=True)
    with (
        _client(chosen, base_url) as (client, default_model),
        _progress(err, enabled=not as_json) as advance,
    ):
        results = lab.run(
            transcripts,
            strategies=list(strategies) or list(lab.DEFAULT_STRATEGIES),
            budgets=list(budgets) or list(lab.DEFAULT_BUDGETS),
            mode=mode,
            client=client,
            backend=chosen,
            model=model or default_model,
            summary_model=summary_model,
            scoring="judge" if judge else "keywords",
            judge_model=judge_model,
            baseline=not no_baseline,
            db=db,
            progress=advance,
        )
    written = results.write(out, plots=not no_plots) if out is not None else []
    if as_json:
        print_json(results.to_dict(timing=True))
    else:
        print_view(results_table(results))
        for run in results.runs:
            if run.summary_failures:
                err.print(
                    f"[yellow]{escape(run.label)}: {run.summary_failures} of "
                    f"{run.summary_calls} summaries failed[/yellow] (those turns fell back to "
                    f"truncation): {escape('; '.join(run.summary_errors))}"
                )
            if run.error:
                err.print(
                    f"[yellow]{escape(run.label)} stopped early:[/yellow] {escape(run.error)}"
                )
    if written:
        err.print(f"wrote {len(written)} files to {escape(str(out))}")


@contextmanager
def _client(backend: str, base_url: str | None) -> Iterator[tuple[Any, str | None]]:
    """The client for ``backend`` (None: the lab's own test server) and its default model."""
    if backend == "test":
        yield None, None
        return
    if backend == "local":
        from conversation_memory.local import LOCAL_MODEL

        with local_client() as client:
            yield client, LOCAL_MODEL
        return
    from conversation_memory.llm import client_from_env

    client = client_from_env(base_url=base_url) if base_url else client_from_env()
    try:
        yield client, None
    finally:
        client.close()


@contextmanager
def _progress(err: Any, *, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (terminals only); yields the lab's progress callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not enabled or not err.is_terminal,
    )
    task = bar.add_task("replaying", total=None)

    def advance(done: int, total: int, label: str) -> None:
        bar.update(task, completed=done, total=total, description=label)

    with bar:
        yield advance


def results_table(results: Results) -> Table:
    """The terminal table: one row per strategy × budget, the baseline last."""
    meta = results.meta
    inputs = meta.get("transcripts") or []
    described = (
        f"{inputs[0]['name']} ({inputs[0]['turns']} turns)"
        if len(inputs) == 1
        else f"{len(inputs)} transcripts"
    )
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        collapse_padding=True,
        pad_edge=False,
        show_edge=False,
        title=f"{described} · model {meta.get('model')} · {meta.get('mode')} · "
        f"{meta.get('backend')} backend",
        title_justify="left",
        caption="tokens by the model's tokenizer; cost estimated from list prices"
        + (f" as of {meta['prices_as_of']}" if meta.get("prices_as_of") else ""),
        caption_justify="left",
    )
    table.add_column("strategy", no_wrap=True)
    for name in (
        "budget",
        "tok/turn\nmean",
        "\np95",
        "\ntotal",
        "\nuse",
        "evidence\nretained",
        "summaries\ncalls",
        "\ntokens",
        "est.\ncost",
        "\nrecall",
        "\nwall",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for run in results.runs:
        style = "dim" if run.baseline else ("yellow" if run.error else None)
        table.add_row(*_row(run, results.timing), style=style)
    return table


def _row(run: Any, timing: Any) -> Sequence[str]:
    m = run.metrics()
    wall = timing.get(run.label)
    over = f" ({run.over_window_turns} over)" if run.over_window_turns else ""
    return (
        escape(run.strategy) + (" ⚠" if run.error else ""),
        "window" if run.budget is None else f"{run.budget:,}",
        "n/a" if m["tokens_mean"] is None else f"{m['tokens_mean']:,.0f}",
        "n/a" if m["tokens_p95"] is None else f"{m['tokens_p95']:,}",
        f"{run.tokens_total:,}{over}",
        "n/a" if m["utilization"] is None else f"{m['utilization']:.0%}",
        run.retention_shown,
        f"{run.summary_calls}"
        + (f" ({run.summary_failures} failed)" if run.summary_failures else ""),
        f"{run.summary_prompt_tokens + run.summary_completion_tokens:,}",
        "n/a"
        if run.cost is None
        else (f"${run.cost:.4f}" if run.cost < 1 else f"${run.cost:,.2f}"),
        run.recall_shown,
        "" if wall is None else f"{wall:.1f}s",
    )
