"""``convmem db``: where the database is, its schema revision, and its upgrade."""

from __future__ import annotations

import click

from conversation_memory import admin
from conversation_memory.cli._app import command, json_option, print_json


@click.group("db")
def db_group() -> None:
    """Find, inspect or upgrade a database (path | current | check | upgrade)."""


@command("current")
@json_option
def current(db: str | None, as_json: bool, debug: bool) -> None:
    """Print the database's schema revision and the one this version needs."""
    found = admin.revision(db)
    revision, head, state = found.current, found.head, found.state
    if as_json:
        print_json(
            {
                "db": found.db,
                "current": revision,
                "head": head,
                "up_to_date": found.up_to_date,
                "state": state,
            }
        )
        return
    advice = {
        "outdated": "outdated: back it up, then run `convmem db upgrade`",
        "too new": "written by a newer version of conversation-memory: upgrade that to open it",
        "empty": "no schema yet: `convmem chat` or `convmem db upgrade` creates it",
    }.get(state, state)
    click.echo(f"{found.db}: revision {revision or '(none)'}; this version needs {head} ({advice})")


@command("upgrade")
@json_option
def upgrade(db: str | None, as_json: bool, debug: bool) -> None:
    """Upgrade the database's schema to the one this version needs.

    Back the database up first. Upgrading a database that is already
    current does nothing. Long steps (indexing stored messages for search)
    report progress on stderr.
    """
    done = admin.upgrade(db, progress=lambda line: click.echo(line, err=True))
    where, before, after = done.db, done.before, done.after
    if as_json:
        print_json({"db": where, "from": before, "to": after})
    elif before == after:
        click.echo(f"{where}: already at {after}")
    else:
        click.echo(f"{where}: upgraded {before or '(empty)'} → {after}")


@command("check")
@json_option
def check(db: str | None, as_json: bool, debug: bool) -> None:
    """Compare the database's tables with the library's models; exit 1 if they differ."""
    checked = admin.check(db)
    where, differences = checked.db, checked.differences
    if as_json:
        print_json({"db": where, "differences": differences})
    elif differences:
        click.echo(f"{where} differs from the models:")
        for line in differences:
            click.echo(f"  {line}")
    else:
        click.echo(f"{where}: schema matches the models")
    if differences:
        raise SystemExit(1)


@command("path")
@json_option
def path(db: str | None, as_json: bool, debug: bool) -> None:
    """Print where the database is: --db, else CONVMEM_DB, else the default file.

    Only the path (or the URL, password hidden), so that
    `sqlite3 "$(convmem db path)"` works; --json adds where it came from and
    whether the file exists. Nothing is opened or created.
    """
    found = admin.locate(db)
    if as_json:
        source = "--db" if found.source == "given" else found.source
        print_json({"db": found.db, "source": source, "exists": found.exists})
    else:
        click.echo(found.db)


for _command in (path, upgrade, current, check):
    db_group.add_command(_command)
