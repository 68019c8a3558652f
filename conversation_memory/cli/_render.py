"""How ``convmem`` shows what the library returns: tables, panels, and their JSON twins.

Nothing here decides anything about memory; it only lays out reports the
library has already computed (the context's token report, usage rows,
conversation listings, search hits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from conversation_memory import Context, get_model

PREVIEW = 72


def short_id(conversation_id: str) -> str:
    return conversation_id[:12]


def ago(when: datetime, now: datetime | None = None) -> str:
    """'3 min ago', '2 h ago', or a date for anything older than a week."""
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 7 * 86400:
        return f"{int(seconds // 86400)} d ago"
    return when.astimezone().strftime("%Y-%m-%d")


def content_text(message: Mapping[str, Any], separator: str = "\n") -> str:
    """A message's content as text; non-text parts shown as ``[type]``."""
    content = message.get("content")
    if isinstance(content, list):
        return separator.join(
            part.get("text", f"[{part.get('type', 'part')}]")
            for part in content
            if isinstance(part, dict)
        )
    return str(content or "")


def preview(message: Mapping[str, Any], width: int = PREVIEW) -> str:
    """One line of a message: its text, or what its tool calls ask for."""
    text = " ".join(content_text(message, " ").split())
    calls = message.get("tool_calls") or []
    if calls:
        names = ", ".join(call.get("function", {}).get("name", "?") for call in calls)
        text = f"{text} [calls {names}]".strip()
    if message.get("role") == "tool":
        text = f"[result of {message.get('tool_call_id', '?')}] {text}"
    return text if len(text) <= width else text[: width - 1] + "…"


def money(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


# -- sessions -------------------------------------------------------------------------


def sessions_table(rows: Sequence[Any], *, total: int) -> Table:
    shown = f"the {len(rows)} most recent of {total:,}; --all or --limit N for more"
    table = Table(
        caption=shown if total > len(rows) else None,
        title=f"{total:,} conversation{'s' if total != 1 else ''}",
        title_justify="left",
    )
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("title")
    table.add_column("user")
    table.add_column("messages", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("last activity", no_wrap=True)
    table.add_column("model", style="dim")
    keyed = any(row.key is not None for row in rows)
    if keyed:  # only for an application that keys its conversations
        table.add_column("key", no_wrap=True)
    for row in rows:
        title = Text(row.title or "")  # text, never markup: a title may hold "[draft]"
        if row.forked_from:
            fork = f"(fork of {short_id(row.forked_from)})"
            title.append(f" {fork}" if row.title else fork, style="dim")
        table.add_row(
            short_id(row.id),
            title,
            escape(row.user),
            f"{row.message_count:,}",
            f"{row.tokens:,}",
            ago(row.updated_at),
            escape(row.model),
            *([Text(row.key or "")] if keyed else []),
        )
    return table


# -- show -----------------------------------------------------------------------------

ROLE_STYLE = {
    "system": "magenta",
    "developer": "magenta",
    "user": "bold green",
    "assistant": "bold blue",
    "tool": "yellow",
}


def message_text(message: dict[str, Any]) -> str:
    text = content_text(message)
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        text += f"\n→ {function.get('name', '?')}({function.get('arguments', '')})"
    return text.strip()


def history_view(
    info: Any, system: str | None, entries: Sequence[Any], summaries: Sequence[Any]
) -> Group:
    """Every message in order; each summary shown after the last message it covers."""
    after: dict[int, list[Any]] = {}
    for summary in summaries:
        after.setdefault(summary.end, []).append(summary)
    parts: list[Any] = [
        Text.assemble(
            (f"{info.title or 'untitled'}", "bold"),
            f"  {info.id}  user {info.user}  model {info.model}  ",
            f"key {info.key}  " if info.key is not None else "",
            (f"{info.message_count} messages, {info.tokens:,} tokens", "dim"),
        )
    ]
    if system:
        parts.append(Text.assemble(("system  ", ROLE_STYLE["system"]), system))
    for entry in entries:
        role = entry.message.get("role", "?")
        flags = []
        if entry.pinned:
            flags.append("pinned")
        if not entry.complete:
            flags.append("incomplete")
        if entry.metadata and entry.metadata.get("finish_reason") in {"length", "content_filter"}:
            flags.append("cut off")
        head = Text.assemble(
            (f"#{entry.position} {role}", ROLE_STYLE.get(role, "")),
            (f"  {entry.tokens} tok  {entry.created_at.astimezone():%Y-%m-%d %H:%M}", "dim"),
            (f"  [{', '.join(flags)}]" if flags else "", "red"),
        )
        parts.append(head)
        parts.append(
            Text(message_text(entry.message) or "(empty)", style="" if entry.complete else "dim")
        )
        for summary in after.get(entry.position, ()):
            parts.append(
                Panel(
                    summary.text,
                    title=f"summary of messages {summary.start}–{summary.end} "
                    f"(level {summary.level}, {summary.tokens} tok)",
                    title_align="left",
                    border_style="cyan",
                )
            )
    return Group(*parts)


# -- search ---------------------------------------------------------------------------

MARK = "**"
"""What a search snippet puts on each side of a matched word (``SearchHit.snippet``)."""


def snippet_text(snippet: str, *, highlight: bool) -> Text:
    """A snippet on one line. With ``highlight`` (a terminal) its matched words are
    bold instead of between marks; a snippet whose marks don't pair up (the message
    itself had a stray ``**``) stays as it is."""
    line = " ".join(snippet.split())
    if not highlight or line.count(MARK) % 2:
        return Text(line)
    text = Text()
    for n, piece in enumerate(line.split(MARK)):
        text.append(piece, style="bold yellow" if n % 2 else "")
    return text


def search_table(hits: Sequence[Any], *, highlight: bool) -> Table:
    """Search hits, best first: where each message is, when, who said it, the match."""
    table = Table(
        title=f"{len(hits)} match{'es' if len(hits) != 1 else ''}, best first",
        title_justify="left",
    )
    table.add_column("conversation", no_wrap=True)
    table.add_column("#", justify="right", style="dim")
    table.add_column("when", no_wrap=True, style="dim")
    table.add_column("role")
    table.add_column("match")
    for hit in hits:
        table.add_row(
            Text.assemble((short_id(hit.conversation_id), "cyan"), f" {hit.title or ''}"),
            str(hit.position),
            f"{hit.created_at.astimezone():%Y-%m-%d %H:%M}",
            Text(hit.role, style=ROLE_STYLE.get(hit.role, "")),
            snippet_text(hit.snippet, highlight=highlight),
        )
    return table


# -- context --------------------------------------------------------------------------


def context_rows(context: Context) -> list[dict[str, Any]]:
    """The parts of the next request in the order they are sent, with their tokens."""

    def item_row(item: Any) -> dict[str, Any]:
        system = item.position < 0  # the system prompt is stored outside the log
        return {
            "kind": "system" if system else ("pinned" if item.pinned else "message"),
            "position": None if system else item.position,
            "role": item.message.get("role"),
            "tokens": item.tokens,
            "preview": preview(item.message),
        }

    split = context.summary_index
    summaries = [
        {
            "kind": "summary",
            "position": f"{summary.start}-{summary.end}",
            "role": "system",
            "tokens": summary.tokens,
            "preview": " ".join(summary.text.split())[:PREVIEW],
        }
        for summary in context.summaries
    ]
    # The recall message is one part; its turns, scores and tokens are in the report.
    recalled: list[dict[str, Any]] = []
    if context.recalled:
        turns = context.recalled
        recalled.append(
            {
                "kind": "recall",
                "position": ", ".join(f"{t.start}-{t.end}" for t in turns),
                "role": "system",
                "tokens": context.report.recall,
                "preview": " ".join(" ".join(t.text.split()) for t in turns)[:PREVIEW],
            }
        )
    return [
        *map(item_row, context.items[:split]),
        *summaries,
        *recalled,
        *map(item_row, context.items[split:]),
    ]


def context_json(context: Context, *, model: str) -> dict[str, Any]:
    r = context.report
    return {
        "model": model,
        "messages": context.messages,
        "parts": context_rows(context),
        "report": asdict(r),
        "estimated_cost": estimated_cost(model, r.corrected + r.tools, r.reserve),
    }


def estimated_cost(model: str, prompt: int, reserve: int) -> dict[str, float | None]:
    """Prompt cost of the next request, and the most the reply could add."""
    info = get_model(model)
    return {"prompt": info.cost(prompt, 0), "with_full_reply": info.cost(prompt, reserve)}


def _bar(part: int, whole: int, width: int = 24) -> str:
    filled = 0 if whole <= 0 else round(width * part / whole)
    return "█" * filled + "░" * (width - filled)


def context_view(context: Context, *, model: str) -> Group:
    """The next request, part by part, then where the window goes."""
    r = context.report
    table = Table(title="the next request, in the order it is sent", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("part")
    table.add_column("pos", justify="right", style="dim")
    table.add_column("tokens", justify="right")
    table.add_column("content")
    for number, row in enumerate(context_rows(context), 1):
        style = {
            "summary": "cyan",
            "recall": "green",
            "system": "magenta",
            "pinned": "yellow",
        }.get(row["kind"], "")
        table.add_row(
            str(number),
            Text(
                f"{row['kind']} ({row['role']})" if row["kind"] == "message" else row["kind"],
                style=style,
            ),
            "" if row["position"] is None else str(row["position"]),
            f"{row['tokens']:,}",
            escape(row["preview"]),
        )
    window = Table.grid(padding=(0, 2))
    window.add_column(style="bold")
    window.add_column(justify="right")
    window.add_column()
    window.add_row("window", f"{r.window:,}", escape(model))
    window.add_row("  system", f"{r.system:,}", _bar(r.system, r.window))
    window.add_row("  pinned", f"{r.pinned:,}", _bar(r.pinned, r.window))
    window.add_row("  summary", f"{r.summary:,}", _bar(r.summary, r.window))
    if r.recall:
        window.add_row("  recalled", f"{r.recall:,}", _bar(r.recall, r.window))
    window.add_row("  messages", f"{r.messages:,}", _bar(r.messages, r.window))
    window.add_row("  priming", f"{r.priming:,}", "")
    if r.tools:
        window.add_row("  tools", f"{r.tools:,}", _bar(r.tools, r.window))
    window.add_row("  reply reserve", f"{r.reserve:,}", _bar(r.reserve, r.window))
    if r.margin:
        window.add_row("  safety margin", f"{r.margin:,}", "")
    window.add_row(
        "prompt",
        f"{r.total:,}",
        f"of {r.limit:,} allowed — {r.utilization:.1%} of the budget"
        + (f"; {r.corrected:,} after calibration" if r.corrected != r.total else ""),
    )
    cost = estimated_cost(model, r.corrected + r.tools, r.reserve)
    window.add_row(
        "est. cost",
        money(cost["prompt"]),
        f"prompt; up to {money(cost['with_full_reply'])} with a full-length reply",
    )
    notes: list[str] = []
    if r.dropped:
        notes.append(
            f"left out the oldest {r.dropped} message(s) "
            f"(positions {r.first_dropped}–{r.last_dropped}): still stored, just not sent"
        )
    if r.covered:
        notes.append(f"{r.covered} message(s) are represented by the summary instead of sent")
    for turn in r.recalled:
        notes.append(
            f"recalled messages {turn.first}–{turn.last} (score {turn.score:.3g}, "
            f"{turn.tokens} tokens): an earlier turn matching the newest question"
        )
    if r.overlap:
        notes.append(
            f"{r.overlap} message(s) the summary represents are also sent as they are: the "
            "summary strategy fills the room beside it with the newest turns"
        )
    if r.partial_turn is not None:
        notes.append(
            f"the newest turn (from position {r.partial_turn}) is larger than the budget: "
            "only its newest part is sent, without its question"
        )
    if r.summary_omitted:
        notes.append("a summary exists but did not fit beside what must be sent")
    if r.repaired:
        notes.append(
            f"repaired unanswered tool calls at positions {', '.join(map(str, r.repaired))}"
        )
    if r.orphaned:
        notes.append(
            f"left out tool results without their call at {', '.join(map(str, r.orphaned))}"
        )
    if not notes:
        notes.append("nothing was left out: the whole conversation fits")
    return Group(
        table,
        Panel(window, title=f"budget — strategy {escape(r.strategy)}", title_align="left"),
        *(Text(f"• {note}", style="dim") for note in notes),
    )


# -- usage ----------------------------------------------------------------------------


def usage_view(calls: Sequence[Any], totals: Any) -> Group:
    table = Table(
        title=f"{len(calls)} model call{'s' if len(calls) != 1 else ''}", title_justify="left"
    )
    for name, justify in (
        ("when", "left"),
        ("kind", "left"),
        ("model", "left"),
        ("prompt", "right"),
        ("reply", "right"),
        ("latency", "right"),
        ("cost", "right"),
        ("outcome", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for call in calls:
        table.add_row(
            f"{call.created_at.astimezone():%Y-%m-%d %H:%M:%S}",
            call.kind,
            escape(call.model),
            f"{call.prompt_tokens:,}",
            f"{call.completion_tokens:,}",
            "" if call.latency_ms is None else f"{call.latency_ms / 1000:.2f} s",
            money(call.cost),
            Text(call.error[:60], style="red")
            if call.error
            else Text(call.finish_reason or "", style="dim"),
        )
    table.add_section()
    table.add_row(
        "total",
        f"{totals.summary_calls} summaries",
        "",
        f"{totals.prompt_tokens:,}",
        f"{totals.completion_tokens:,}",
        f"{totals.latency_ms / 1000:.2f} s",
        money(totals.cost),
        Text(f"{totals.failed} failed", style="red") if totals.failed else "",
        style="bold",
    )
    return Group(table)
