"""``convmem chat``: talk with memory in the terminal, or through a pipe.

Which server answers: ``--base-url`` if given; else the OpenAI-compatible
server that ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` describe; with neither,
a local model (SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1),
started for the session and stopped when it ends.

Everything cheap is checked before a model server starts (the local one
takes seconds): the input, the database, the settings and the conversation
named. A new conversation is stored with its first reply
(``Memory.conversation(lazy=True)``), so a chat that fails or is left before
anything was said leaves no empty conversation for the next ``convmem chat``
to resume.

Compaction runs after a reply, behind a spinner, rather than inside the
stream, so the reply is on screen before any summary is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import click
from rich.markup import escape

from conversation_memory import (
    Conversation,
    Memory,
    RetryPolicy,
    UsageTotals,
    get_model,
    register_model,
)
from conversation_memory.cli import _render
from conversation_memory.cli._app import (
    Integer,
    Number,
    command,
    console,
    local_client,
    user_option,
)
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    ConversationMemoryError,
    ModelError,
    UnknownModel,
)
from conversation_memory.llm import server_configured
from conversation_memory.local import LOCAL_MODEL, LOCAL_SYSTEM

DEFAULT_SYSTEM = LOCAL_SYSTEM
"""Sent when a new conversation names no system prompt.

Some local chat templates insert their own (uncounted) system prompt when a
request has none; sending ours keeps the count exact.
"""

DEFAULT_STRATEGY = "summary"
LOCAL_STRATEGY = "recall"
"""The local model's default: the newest turns, plus the earlier turns that match the new
question, searched in the archive (no model needed). Not summaries: SmolLM2-135M's run
past their size cap and are refused (measured: 24 of 24 in a 40-turn chat), so
summarizing would only add waits. A request carrying recalled turns costs llama.cpp a
fresh read of its window (its cache is reused only up to where two prompts differ)."""

HELP = """\
/context   what the next request will send, with its tokens
/history   the whole conversation, summaries included
/usage     tokens, latency and cost of every model call
/fork      continue in a fork of this conversation (the original stays as it is)
/new       start a new conversation
/help      this list
/exit      leave (Ctrl-D does too)
Ctrl-C during a reply stops it; the part received is stored as incomplete."""


CUT_OFF = {
    "length": "the reply was cut off at the model's output limit (finish_reason length); "
    "ask it to go on for the rest",
    "content_filter": "the reply was cut off by the server's content filter",
}
"""What to say after a reply the server stopped early (it is stored with that mark)."""

NO_INPUT = (
    "stdin is not a terminal and holds no message to send; run `convmem chat` in a "
    "terminal to chat, or pipe messages in, one per line: printf 'hello\\n' | convmem chat"
)


def _known(model: str) -> bool:
    try:
        get_model(model)
    except UnknownModel:
        return False
    return True


@contextmanager
def model_client(base_url: str | None, *, local: bool) -> Iterator[Any]:
    """The client to talk through (None: built from the environment by the library)."""
    if base_url is not None:
        from conversation_memory.llm import client_from_env  # imports the SDK: only here

        with client_from_env(base_url=base_url) as client:  # closes its connections
            yield client
    elif local:
        with local_client() as client:
            yield client
    else:
        yield None


class Session:
    """One chat session: the current conversation and what the commands do with it."""

    def __init__(
        self,
        memory: Memory,
        conversation: Conversation,
        *,
        interactive: bool,
        settings: dict[str, Any],
    ) -> None:
        self.memory = memory
        self.conversation = conversation
        self.interactive = interactive
        self.settings = settings
        self.out = console()
        self.err = console(stderr=True)

    def banner(self) -> None:
        c = self.conversation
        count = len(c)
        state = "new conversation" if count == 0 else f"resumed, {count} messages"
        self.err.print(
            f"[bold]{c.title or 'untitled'}[/bold] [dim]{c.id[:12]} · {state} · model {c.model} · "
            f"strategy {c.strategy.name} · budget {c.budget().limit:,} tokens[/dim]\n"
            "[dim]/help for commands, Ctrl-D to leave[/dim]"
        )

    def waiting(self, text: str) -> Any:
        """A spinner on stderr while something takes a moment (none when piped)."""
        return self.err.status(text) if self.interactive else nullcontext()

    def turn(self, text: str) -> None:
        """Send one message, print the reply as it streams, then compact if asked."""
        stream = self.conversation.stream(text)
        with self.waiting("thinking…") as status:
            try:
                with stream:
                    for piece in stream:
                        if status is not None:
                            status.stop()  # the reply has started (stopping twice is a no-op)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except KeyboardInterrupt:
                if status is not None:
                    status.stop()
                kept = (
                    "stored as incomplete" if self.memory.on_incomplete == "store" else "not stored"
                )
                sys.stdout.write("\n")
                self.err.print(f"[yellow]stopped; the partial reply was {kept}[/yellow]")
                return
        sys.stdout.write("\n")
        sys.stdout.flush()
        cut = CUT_OFF.get(stream.reply.finish_reason) if stream.reply is not None else None
        if cut:
            self.err.print(f"[yellow]{cut}[/yellow]")
        if stream.fold_wanted:
            self.compact()

    def compact(self) -> None:
        try:
            with self.waiting("updating the summary of older turns…"):
                outcome = self.conversation.compact()
        except ConversationMemoryError as error:
            self.err.print(
                f"[yellow]summary not updated ({escape(str(error))}); older turns are left out "
                "until it works[/yellow]"
            )
            return
        if outcome.error:
            self.err.print(
                f"[yellow]summary not updated ({escape(outcome.error)}); "
                "retried after the next turn[/yellow]"
            )

    def command(self, line: str) -> bool:
        """Run an in-chat command; False means leave."""
        name = line.split(maxsplit=1)[0].lower()
        c = self.conversation
        if name in {"/exit", "/quit"}:
            return False
        if name == "/help":
            self.out.print(HELP, highlight=False)
        elif name == "/context":
            self.out.print(_render.context_view(c.context(), model=c.model))
        elif not len(c) and name in {"/history", "/fork"}:
            # A new conversation is stored with its first reply: nothing to show or share yet.
            self.err.print("nothing said yet: the conversation starts with your first message")
        elif name == "/history":
            info = self.memory.find(c.id, user=c.user)
            self.out.print(_render.history_view(info, c.system, c.entries(), c.summary_cover()))
        elif name == "/usage":
            calls = c.calls()
            self.out.print(_render.usage_view(calls, UsageTotals.of(calls)))
        elif name == "/fork":
            self.conversation = c.fork()
            self.err.print(f"now in fork {self.conversation.id[:12]} of {c.id[:12]}")
        elif name == "/new":
            self.conversation = self.memory.conversation(**self.settings)
            self.err.print(f"new conversation {self.conversation.id[:12]}")
        else:
            self.err.print(f"[red]unknown command {name}[/red]; /help lists them")
        return True

    def loop(self, read: Callable[[], str]) -> None:
        while True:
            try:
                line = read()
            except EOFError:
                if self.interactive:
                    self.err.print()
                return
            except KeyboardInterrupt:
                self.err.print()
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and " " not in text:
                if not self.command(text):
                    return
                continue
            try:
                self.turn(line.rstrip("\n"))
            except (ModelError, BudgetExceeded) as error:
                # Nothing of the turn was stored; in a terminal the chat goes on.
                if not self.interactive:
                    raise
                what = "the model call failed" if isinstance(error, ModelError) else "not sent"
                self.err.print(f"[red]{what}: {escape(str(error))}[/red]")


def read_terminal() -> str:
    import readline  # noqa: F401  (line editing and history for input())

    return input("you › ")


@command("chat")
@click.argument("ref", metavar="[ID]", required=False)
@click.option("--new", "new", is_flag=True, help="Start a new conversation instead of resuming.")
@click.option("--title", "-t", default=None, help="Title of a new conversation.")
@click.option("--system", default=None, help="System prompt of a new conversation.")
@click.option(
    "--model",
    "-m",
    default=None,
    help="Model name (default: CONVMEM_MODEL, else gpt-4o-mini; the local model without a key).",
)
@click.option(
    "--base-url",
    default=None,
    metavar="URL",
    help="An OpenAI-compatible server (llama.cpp, vLLM, Ollama…).",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Context window of --model in tokens, for a model outside the registry (Ollama, "
    "llama.cpp, vLLM…); for every command, list it in a CONVMEM_MODELS file instead.",
)
@click.option(
    "--max-output",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Most tokens one reply of --model may have (default: a quarter of --window, at most "
    "4,096).",
)
@click.option(
    "--strategy",
    "-s",
    default=None,
    help="truncate | window:N | summary[:high=..,low=..] | hierarchical[:fanout=F] | recall, "
    "or any of them +recall, e.g. summary+recall (default: summary; recall on the local "
    "model, whose summaries fail).",
)
@click.option(
    "--budget",
    "-b",
    type=Integer(min=1),
    default=None,
    metavar="TOKENS",
    help="Prompt token cap (default: the model's window minus the reply reserve).",
)
@click.option(
    "--timeout",
    type=Number(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Give up on a reply after this long, retries included "
    f"(default: {RetryPolicy().deadline:g}).",
)
@user_option("Whose conversations to use (default: 'default').")
def chat(
    db: str | None,
    ref: str | None,
    new: bool,
    title: str | None,
    system: str | None,
    model: str | None,
    base_url: str | None,
    window: int | None,
    max_output: int | None,
    strategy: str | None,
    budget: int | None,
    timeout: float | None,
    user: str | None,
    debug: bool,
) -> None:
    """Chat with memory; resumes the most recent conversation.

    ID resumes a conversation by id, key, id prefix or title; --new starts one.
    Replies stream as they arrive. With stdin not a terminal, each line is
    one message and each reply is printed, so a chat can be scripted:

        printf 'hello\\nwhat did I just say?\\n' | convmem chat --new
    """
    if new and ref is not None:
        raise click.UsageError("give an ID to resume or --new, not both")
    if window is not None or max_output is not None:
        if model is None:
            raise click.UsageError("--window and --max-output describe a model: give --model too")
        # For this process only; resume it later with the same options or a CONVMEM_MODELS file.
        like = model if _known(model) else None
        register_model(model, like=like, window=window, max_output=max_output)
    interactive = sys.stdin.isatty()
    read = read_terminal if interactive else _lines()
    local = base_url is None and not server_configured()
    chosen_model = model or (LOCAL_MODEL if local else None)
    with ExitStack() as stack:
        retry = RetryPolicy(deadline=timeout) if timeout is not None else None
        memory = stack.enter_context(
            Memory(db, model=chosen_model, compaction="manual", retry=retry)
        )
        settings: dict[str, Any] = {
            "user": user,
            "system": system or DEFAULT_SYSTEM,
            "model": chosen_model,
            "strategy": strategy or (LOCAL_STRATEGY if local else DEFAULT_STRATEGY),
            "budget": budget,
            "title": title,
            "lazy": True,
        }
        conversation = resume(memory, ref, new=new, settings=settings, strategy=strategy)
        # Only now, with the database and the settings known to work, start a server.
        memory.client = stack.enter_context(model_client(base_url, local=local))
        session = Session(memory, conversation, interactive=interactive, settings=settings)
        if interactive:
            session.banner()
        session.loop(read)


def _lines() -> Callable[[], str]:
    """Messages from a pipe. The first is read now, so that an empty pipe (the quick
    start run without a terminal) says what to do before anything starts."""
    first = sys.stdin.readline()
    while first and not first.strip():
        first = sys.stdin.readline()
    if not first:
        raise ConfigurationError(NO_INPUT, argument="stdin")
    waiting = [first]

    def read() -> str:
        line = waiting.pop() if waiting else sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


def resume(
    memory: Memory, ref: str | None, *, new: bool, settings: dict[str, Any], strategy: str | None
) -> Conversation:
    """The conversation to chat in: the one named, a new one, or the most recent.

    A resumed conversation keeps its stored strategy unless ``strategy`` is given.
    """
    if ref is None and not new:
        latest = memory.conversations(user=settings["user"], limit=1)
        if latest:
            ref = latest[0].id
    if ref is None:
        return memory.conversation(**settings)
    info = memory.find(ref, user=settings["user"])
    return memory.conversation(
        info.id,
        user=info.user,
        model=settings["model"],
        strategy=strategy,
        budget=settings["budget"],
    )
