"""``convmem``: the command-line face of conversation_memory.

A thin layer: every command calls the library and prints what it returns,
as rich tables in a terminal or JSON with ``--json``. Exit codes are listed in
``conversation_memory.cli._app``.
"""

from __future__ import annotations

import click

from conversation_memory.cli import chat, db, lab, sessions

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="conversation-memory", prog_name="convmem")
@click.option(
    "--db", metavar="PATH|URL", default=None,
    help="The database of the command that follows (its own --db wins).",
)  # fmt: skip
def cli(db: str | None) -> None:
    """Chat with memory, and inspect, fork, export or delete what is remembered.

    Conversations live in one SQLite file in your user data folder
    (`convmem db path` prints where), or wherever --db / CONVMEM_DB point,
    PostgreSQL URLs included; --db goes before or after the command. With
    OPENAI_API_KEY or OPENAI_BASE_URL set, `convmem chat` talks to that
    server; with neither, to a small local model.

    Exit codes: 0 ok, 1 error, 2 bad command line, 3 not found, 4 database,
    5 model call failed, 130 interrupted.
    """


for _command in (chat.chat, *sessions.COMMANDS, db.db_group, lab.lab_command):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="convmem")
