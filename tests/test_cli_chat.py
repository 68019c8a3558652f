"""``convmem chat`` when things go wrong (empty input, failed or refused first turns,
bad settings, slow servers, replies cut short), and mistakes explained in the
command line's words rather than Python's.

In-process through the command group (as tests/test_cli.py's ``run``), against
real SQLite files and ``conversation_memory.testing.ChatServer`` over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from click.testing import CliRunner

from conversation_memory.cli import cli
from conversation_memory.testing import ChatServer, Fault

MODEL = "gpt-4o-mini"


def run(*args: str, stdin: str = ""):
    runner = CliRunner(env={k: None for k in os.environ if k.startswith(("OPENAI_", "CONVMEM_"))})
    return runner.invoke(cli, list(args), input=stdin, prog_name="convmem")


def sessions(db: str) -> list[dict]:
    done = run("sessions", "--db", db, "--json")
    assert done.exit_code == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def server():
    with ChatServer(window=128_000, model=MODEL) as server:
        yield server


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "cli.db")


def chat(db: str, server: ChatServer, *args: str, stdin: str):
    return run("chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, *args,
               stdin=stdin)  # fmt: skip


def test_empty_stdin_says_what_to_do_and_creates_nothing(db, server):
    done = chat(db, server, stdin="\n  \n")
    assert done.exit_code == 1
    assert "not a terminal" in done.stderr
    assert "| convmem chat" in done.stderr
    assert not os.path.exists(db), "checked before the database is opened"
    assert server.requests == []


def test_failed_or_refused_first_turns_leave_no_empty_conversation(db, server):
    server.fail(Fault.status(401))
    assert chat(db, server, "--new", stdin="hello\n").exit_code == 5
    assert sessions(db) == []
    refused = chat(db, server, "--new", "--budget", "60", stdin="word " * 100 + "\n")
    assert refused.exit_code == 1
    assert "budget" in refused.stderr
    assert sessions(db) == []
    # In-chat commands before the first message create nothing either.
    idle = chat(db, server, "--new", "--title", "later", stdin="/history\n/fork\n/new\n/exit\n")
    assert idle.exit_code == 0, idle.stderr
    assert "nothing said yet" in idle.stderr
    assert sessions(db) == []

    assert chat(db, server, "--title", "real", stdin="hello\n").exit_code == 0
    [row] = sessions(db)
    assert (row["title"], row["message_count"]) == ("real", 2)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--db", "{dir}"], 4, "directory"),
        (["--strategy", "nonsense"], 1, "unknown strategy"),
        (["--model", "no-such-model"], 1, "no-such-model"),
        (["no-such-conversation"], 3, "no-such-conversation"),
    ],
    ids=["database", "strategy", "model", "conversation"],
)
def test_cheap_checks_come_before_the_local_model(monkeypatch, tmp_path, args, code, says):
    # The local model can't start here (as on a machine without the local extra), so
    # reaching it would fail with its install hint instead of the real problem.
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    args = [arg.format(dir=tmp_path) for arg in args]
    if "--db" not in args:
        args += ["--db", str(tmp_path / "c.db")]
    done = run("chat", *args, stdin="hello\n")
    assert done.exit_code == code, done.stderr
    assert says in done.stderr
    assert "conversation-memory[local]" not in done.stderr


def test_a_hung_server_gives_up_after_timeout_and_names_the_flag(db, server):
    server.fail(Fault.slow_first_byte(5))
    started = time.monotonic()
    done = chat(db, server, "--new", "--timeout", "0.5", stdin="hello\n")
    assert done.exit_code == 5, done.stderr
    assert time.monotonic() - started < 4
    assert "--timeout" in done.stderr


def test_mistakes_are_explained_in_the_command_line_s_words(db, server, tmp_path):
    assert chat(db, server, "--new", stdin="hello\n").exit_code == 0
    exported = tmp_path / "c.jsonl"
    [row] = sessions(db)
    assert run("export", row["id"], "--db", db, "-o", str(exported)).exit_code == 0
    again = run("import", str(exported), "--db", db)
    assert again.exit_code == 1
    assert "--new-id" in again.stderr

    unknown = chat(db, server, "--new", "--strategy", "nonsense", stdin="hi\n").stderr
    for name in ("truncate", "window:N", "summary", "hierarchical"):
        assert name in unknown
    for bad in ("window:-1", "window:0", "window:x"):
        said = chat(db, server, "--new", "--strategy", bad, stdin="hi\n").stderr
        assert f"{bad!r}" in said
        assert "whole number of turns, at least 1" in said, said
        assert "Window(" not in said

    for args in (["chat", "--budget", "abc"], ["context", "x", "--budget", "abc"],
                 ["chat", "--timeout", "soon"]):  # fmt: skip
        said = run(*args, "--db", db).stderr
        assert "abc" in said or "soon" in said
        assert "range" not in said, said


def test_a_reply_cut_short_is_said_in_the_chat_and_kept_in_show(db):
    cut = {"content": "The answer begins with", "finish_reason": "length"}
    with ChatServer(window=128_000, model=MODEL, reply=cut) as server:
        done = chat(db, server, "--new", stdin="tell me everything\n")
    assert done.exit_code == 0, done.stderr
    assert "The answer begins with" in done.stdout
    assert "cut off" in done.stderr
    [row] = sessions(db)
    shown = json.loads(run("show", row["id"], "--db", db, "--json").stdout)["messages"]
    assert shown[1]["metadata"] == {"finish_reason": "length"}
    assert "cut off" in run("show", row["id"], "--db", db).stdout


def test_in_a_terminal_a_refused_message_leaves_the_chat_going(db, server, capsys):
    from conversation_memory import Memory
    from conversation_memory.cli.chat import Session

    lines = iter(["word " * 100, "hello"])

    def read() -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    with server.client() as client, Memory(db, client=client, model=MODEL) as memory:
        conversation = memory.conversation(budget=60, lazy=True)
        Session(memory, conversation, interactive=True, settings={}).loop(read)
        assert "not sent" in capsys.readouterr().err
        assert [m["role"] for m in conversation.history()] == ["user", "assistant"]
