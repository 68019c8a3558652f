"""What every ``convmem`` command shares: options, output, errors and exit codes.

Commands are thin: they call the library and hand what it returns to
``_render``. Errors from the library are printed as one line on stderr
(``--debug`` adds the traceback) and mapped to an exit code:

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     any other error of conversation_memory (bad argument, invalid input)
2     the command line itself is wrong (unknown option, missing argument)
3     not found: no such conversation or user
4     the database: not ours, corrupt, outdated or written by a newer version
5     the model: authentication, rate limit, timeout, server or connection
130   interrupted (Ctrl-C)
====  =====================================================================
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from datetime import datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.measure import Measurement

from conversation_memory import load_models_from_env
from conversation_memory.errors import (
    ConversationMemoryError,
    ModelError,
    NotFound,
    StoreError,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_STORE = 4
EXIT_MODEL = 5
EXIT_INTERRUPTED = 130


def exit_code(error: BaseException) -> int:
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, StoreError):
        return EXIT_STORE
    if isinstance(error, ModelError):
        return EXIT_MODEL
    return EXIT_ERROR


def console(*, stderr: bool = False) -> Console:
    """A console that degrades to plain text when output is not a terminal."""
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr)


def print_view(view: Any) -> None:
    """Print a table or view on stdout: fitted to a terminal, or at its natural width when
    stdout is a pipe or a file, so that nothing is cut (``gpt-4…``) or wrapped at 80
    columns for a reader that has no width at all."""
    out = console()
    if not out.is_terminal:
        natural = Measurement.get(out, out.options.update_width(UNBOUNDED), view).maximum
        out = Console(width=max(natural, 1), highlight=False)
    out.print(view)


UNBOUNDED = 1_000_000
"""Wider than any line a view draws: the width a view is measured in when piped."""


def fail(error: BaseException, *, debug: bool) -> None:
    """Print ``error`` as one line (plus its traceback with --debug) and exit."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    sys.stderr.write(f"convmem: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code(error))


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn our errors (and Ctrl-C) into a one-line message and an exit code."""
    try:
        yield
    except ConversationMemoryError as error:
        fail(error, debug=debug)
    except BrokenPipeError:
        raise  # the reader left (`| head`): click ends quietly, as Unix tools do
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write("convmem: interrupted\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except OSError as error:  # e.g. an unreadable import file or an unwritable -o path
        fail(error, debug=debug)


DB_HELP = (
    "SQLite file or SQLAlchemy URL (default: CONVMEM_DB, else one file in the user data folder)."
)


def db_option(func: F, help_text: str = DB_HELP) -> F:
    return click.option("--db", metavar="PATH|URL", default=None, help=help_text)(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def debug_option(func: F) -> F:
    return click.option(
        "--debug", is_flag=True, help="Show the full traceback when something fails."
    )(func)


class Integer(click.IntRange):
    """click's IntRange, worded for people: "'abc' is not a valid integer", where
    IntRange says "integer range"."""

    name = "integer"


class Number(click.FloatRange):
    """click's FloatRange, likewise: "'soon' is not a valid number"."""

    name = "number"


def user_option(help_text: str) -> Callable[[F], F]:
    return click.option("--user", "-u", default=None, metavar="USER", help=help_text)


def command(
    name: str, *, db_help: str = DB_HELP, **kwargs: Any
) -> Callable[[Callable[..., Any]], click.Command]:
    """A command with ``--db`` and ``--debug`` that runs inside :func:`reported`, knowing
    the models of the ``CONVMEM_MODELS`` file."""

    def wrap(func: Callable[..., Any]) -> click.Command:
        @functools.wraps(func)
        def run(*args: Any, **options: Any) -> Any:
            if options.get("db") is None:  # `convmem --db x.db sessions` names it up front
                options["db"] = click.get_current_context().find_root().params.get("db")
            with reported(options.get("debug", False)):
                load_models_from_env()
                result = func(*args, **options)
                sys.stdout.flush()  # a closed pipe must surface here, not at interpreter exit
                return result

        return click.command(name, **kwargs)(db_option(debug_option(run), db_help))

    return wrap


def _json_default(value: Any) -> Any:
    """What ``json`` can't encode by itself: our dataclasses (one level at a time, no deep
    copy: ``asdict`` made ``sessions --all --json`` over 10,000 rows take 0.4 s) and times."""
    if is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=_json_default, ensure_ascii=False, indent=2))


# -- the local model ---------------------------------------------------------------


@contextmanager
def local_client() -> Iterator[Any]:
    """An SDK client for the local model, its server started behind a spinner and stopped
    when the block ends."""
    from conversation_memory.local import LocalServer

    server = LocalServer()
    with console(stderr=True).status("starting the local model (SmolLM2-135M)…"):
        server.start()
    try:
        yield server.client()
    finally:
        server.stop()
