"""Commands over stored conversations: sessions, show, search, context, usage, export,
import, fork, rm, erase. Each opens the database, asks the library, and prints.

Only ``import`` may create a database (once its file has been read and found
valid): the others open an existing one (``Memory(db, create=False)``), so a
mistyped ``--db`` is an error rather than a new empty database.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from conversation_memory import Memory, UsageTotals, read_export
from conversation_memory.cli import _render
from conversation_memory.cli._app import (
    Integer,
    command,
    console,
    json_option,
    print_json,
    print_view,
    user_option,
)
from conversation_memory.errors import ConfigurationError


def resolve(memory: Memory, ref: str, user: str | None) -> Any:
    """The conversation a command line names, resumed as its owner."""
    info = memory.find(ref, user=user)
    return info, memory.conversation(info.id, user=info.user)


PAGE = 50
"""Conversations ``convmem sessions`` lists unless told otherwise."""

REF = click.argument("ref", metavar="ID")
USER = user_option("Only look among this user's conversations.")


@command("sessions")
@user_option("Only this user's conversations.")
@click.option(
    "--limit", "-n", type=Integer(min=1), default=PAGE, show_default=True,
    help="Show the N most recent.",
)  # fmt: skip
@click.option("--all", "show_all", is_flag=True, help="Show every conversation (no limit).")
@json_option
def sessions(
    db: str | None, user: str | None, limit: int, show_all: bool, as_json: bool, debug: bool
) -> None:
    """List conversations, most recent activity first.

    Shows id (the first 12 characters are enough anywhere an ID is asked
    for), title, user, messages, tokens and last activity, and the key of
    conversations an application keyed.
    """
    with Memory(db, create=False) as memory:
        rows = memory.conversations(
            user=user, all_users=user is None, limit=None if show_all else limit
        )
        total = (
            len(rows)
            if show_all or len(rows) < limit
            else memory.count(user=user, all_users=user is None)
        )
    if as_json:
        print_json(rows)
    elif rows:
        print_view(_render.sessions_table(rows, total=total))
    else:
        click.echo("no conversations yet: start one with `convmem chat`")


@command("show")
@REF
@USER
@json_option
def show(db: str | None, ref: str, user: str | None, as_json: bool, debug: bool) -> None:
    """Print a conversation's full history, with its summaries where they sit.

    ID is an id, a key, a title (the most recent one with that title),
    or a unique id prefix.
    """
    with Memory(db, create=False) as memory:
        info, conversation = resolve(memory, ref, user)
        entries = conversation.entries()
        summaries = conversation.summary_cover()
        system = conversation.system
    if as_json:
        print_json(
            {
                "conversation": info,
                "system": system,
                "messages": [
                    {
                        "position": e.position,
                        "message": e.message,
                        "tokens": e.tokens,
                        "created_at": e.created_at,
                        "pinned": e.pinned,
                        "complete": e.complete,
                        "metadata": e.metadata,
                    }
                    for e in entries
                ],
                "summaries": summaries,
            }
        )
        return
    print_view(_render.history_view(info, system, entries, summaries))


SEARCH_PAGE = 20
"""Matches ``convmem search`` shows unless told otherwise."""
EVERY_MATCH = 1000
"""What ``convmem search --all`` asks for: the most one search returns."""


@command("search")
@click.argument("words", nargs=-1, required=True, metavar="TEXT...")
@user_option("Only this user's conversations.")
@click.option(
    "--conversation", "-c", "ref", default=None, metavar="ID",
    help="Only this conversation and the history it shares with the one it was forked from.",
)  # fmt: skip
@click.option(
    "--limit", "-n", type=Integer(min=1), default=SEARCH_PAGE, show_default=True,
    help="Show the N best matches.",
)  # fmt: skip
@click.option(
    "--all", "show_all", is_flag=True, help=f"Show every match (at most {EVERY_MATCH:,})."
)
@json_option
def search(
    db: str | None,
    words: tuple[str, ...],
    user: str | None,
    ref: str | None,
    limit: int,
    show_all: bool,
    as_json: bool,
    debug: bool,
) -> None:
    """Find stored messages by the words they hold, best match first.

    TEXT is words, not a query language: quotes, *, - and OR are just
    characters. A message matches when it holds any of the words; more of
    them, and rarer ones, rank higher. Searches every user's conversations,
    or --user's, or one conversation (-c ID). Shows where each message is,
    when, who said it, and the words around the match. Words that start
    with - go after -- (convmem search -- -v).
    """
    text = " ".join(words)
    limit = EVERY_MATCH if show_all else limit
    with Memory(db, create=False) as memory:
        if ref is None:
            hits = memory.search(text, user=user, all_users=user is None, limit=limit)
        else:
            _, conversation = resolve(memory, ref, user)
            hits = conversation.search(text, limit=limit)
    if as_json:
        print_json(hits)
    elif hits:
        print_view(_render.search_table(hits, highlight=console().is_terminal))
    else:
        click.echo(f"no stored message holds any of the words of {text!r}")


@command("context")
@REF
@USER
@click.option(
    "--strategy", "-s", default=None, help="Show it under another strategy, e.g. window:20."
)
@click.option(
    "--budget",
    "-b",
    type=Integer(min=1),
    default=None,
    help="Show it under another prompt budget.",
)
@json_option
def context(
    db: str | None,
    ref: str,
    user: str | None,
    strategy: str | None,
    budget: int | None,
    as_json: bool,
    debug: bool,
) -> None:
    """Show exactly what the next request would send, and why.

    Every message and summary with its tokens, the window, the reply
    reserve, utilization and an estimated cost: the answer to "why did
    the model forget that?". Nothing is sent and nothing is stored;
    --strategy and --budget show the same conversation under other
    settings without changing it.
    """
    with Memory(db, create=False) as memory:
        info = memory.find(ref, user=user)
        conversation = memory.conversation(
            info.id, user=info.user, strategy=strategy, budget=budget
        )
        built = conversation.context()
        model = conversation.model
    if as_json:
        print_json({"conversation": info.id, **_render.context_json(built, model=model)})
        return
    print_view(_render.context_view(built, model=model))


@command("usage")
@REF
@USER
@json_option
def usage(db: str | None, ref: str, user: str | None, as_json: bool, debug: bool) -> None:
    """Tokens, latency and estimated cost of every model call, and in total."""
    with Memory(db, create=False) as memory:
        _, conversation = resolve(memory, ref, user)
        calls = conversation.calls()
    totals = UsageTotals.of(calls)
    if as_json:
        print_json({"conversation": conversation.id, "calls": calls, "total": totals})
        return
    print_view(_render.usage_view(calls, totals))


@command("export")
@REF
@USER
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to FILE instead of stdout.",
)
def export(db: str | None, ref: str, user: str | None, output: str | None, debug: bool) -> None:
    """Write a conversation as JSONL: a header line, then one message per line.

    `convmem import` reads it back; exporting the import again gives the
    same bytes.
    """
    with Memory(db, create=False) as memory:
        _, conversation = resolve(memory, ref, user)
        text = conversation.export()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


@command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@user_option("Store it as this user's (default: the user in the file).")
@click.option(
    "--new-id", is_flag=True, help="Give it a fresh id (to import a copy next to the original)."
)
@json_option
def import_(
    db: str | None, file: str, user: str | None, new_id: bool, as_json: bool, debug: bool
) -> None:
    """Load a conversation from a JSONL file written by `convmem export`.

    Nothing is written unless every line is valid; a bad line is named
    in the error.
    """
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    parsed = read_export(data)  # checked first: a bad file creates no database
    with Memory(db) as memory:
        with console(stderr=True).status("importing…"):
            conversation = memory.import_conversation(parsed, user=user, new_id=new_id)
        info = memory.find(conversation.id, user=conversation.user)
    if as_json:
        print_json(info)
    else:
        click.echo(f"imported {info.id} ({info.message_count} messages, {info.tokens:,} tokens)")


@command("fork")
@REF
@USER
@click.option(
    "--at",
    type=int,
    default=None,
    help="Last message position to share (default: all; -1 for none).",
)
@click.option("--title", default=None, help="Title of the fork (default: the original's).")
@json_option
def fork(
    db: str | None,
    ref: str,
    user: str | None,
    at: int | None,
    title: str | None,
    as_json: bool,
    debug: bool,
) -> None:
    """Start a new conversation that shares messages 0..AT with this one.

    Nothing is copied: the fork points at its parent. Continue it with
    `convmem chat NEW_ID`.
    """
    with Memory(db, create=False) as memory:
        _, conversation = resolve(memory, ref, user)
        child = conversation.fork(at, title=title)
        info = memory.find(child.id, user=child.user)
    if as_json:
        print_json(info)
    else:
        click.echo(
            f"forked {info.id} from {conversation.id} ({info.message_count} messages shared)"
        )


def confirm(what: str, *, yes: bool) -> None:
    """Ask before deleting ``what``, unless --yes. With stdin not a terminal there is
    no one to ask, and a script that forgot --yes must not delete anything."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigurationError(
            f"pass --yes to delete {what}: stdin is not a terminal, so nobody can be asked "
            "(nothing was deleted)"
        )
    click.confirm(f"delete {what}?", abort=True)


YES = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask (needed when stdin is not a terminal)."
)


@command("rm")
@REF
@USER
@YES
@json_option
def rm(db: str | None, ref: str, user: str | None, yes: bool, as_json: bool, debug: bool) -> None:
    """Delete a conversation with its summaries and usage.

    Forks of it keep the messages they share. Asks first unless --yes;
    with stdin not a terminal, nothing is deleted without --yes.
    """
    with Memory(db, create=False) as memory:
        info, conversation = resolve(memory, ref, user)
        confirm(f"{info.id} ({info.title or 'untitled'}, {info.message_count} messages)", yes=yes)
        conversation.delete()
    if as_json:
        print_json({"deleted": info.id})
    else:
        click.echo(f"deleted {info.id}")


@command("erase")
@click.option("--user", "-u", required=True, metavar="USER", help="The user whose data goes.")
@YES
@json_option
def erase(db: str | None, user: str, yes: bool, as_json: bool, debug: bool) -> None:
    """Delete everything stored for a user: conversations, summaries, usage.

    Asks first unless --yes; with stdin not a terminal, nothing is deleted
    without --yes.
    """
    with Memory(db, create=False) as memory:
        confirm(f"every conversation of user {user!r}", yes=yes)
        erased = memory.erase_user(user)
    if as_json:
        print_json({"user": user, "conversations": erased})
    else:
        click.echo(f"erased {erased} conversation(s) of user {user!r}")


COMMANDS = (sessions, show, search, context, usage, export, import_, fork, rm, erase)
