"""``convmem``'s manners: one-line errors, ids, pipes, and the conventions of Unix tools.

What a careless or scripted use runs into: an error must be one line on
stderr with the documented exit code (never twice, never a traceback); an
ambiguous id prefix lists the candidates; output into a pipe is never cut to
80 columns, and a pipe closed early ends the command quietly; ``--db`` works
before the subcommand, ``postgres://`` URLs and files with a byte-order mark
are accepted, and deleting needs ``--yes`` when nobody can be asked.
Commands run in-process through click's runner, and as subprocesses of the
installed script where a real pipe is the point.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_cli import CONVMEM, MODEL, env_without_keys, run, run_json

from conversation_memory import Memory, errors
from conversation_memory.testing import ChatServer, Fault


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "cli.db")


def stored(db: str, *, title: str | None = None, text: str = "hello", user: str = "default"):
    """One conversation with one message, as the library stores it; its id."""
    with Memory(db) as memory:
        conversation = memory.conversation(user=user, title=title, model=MODEL)
        conversation.append({"role": "user", "content": text})
        return conversation.id


def imported(db: str, conversation_id: str, *, title: str) -> None:
    """A conversation with a chosen id (ids are random; prefixes need planning)."""
    with Memory(":memory:") as scratch:
        source = scratch.conversation(title=title, model=MODEL)
        source.append({"role": "user", "content": "hi"})
        header, *lines = source.export().splitlines(keepends=True)
    fields = json.loads(header)
    fields["id"] = conversation_id
    with Memory(db) as memory:
        memory.import_conversation(json.dumps(fields) + "\n" + "".join(lines))


def one_error_line(result) -> str:
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("convmem: error: "), result.stderr
    return result.stderr


# -- 11: every error once, on one line, with its exit code ----------------------------


def test_a_failed_model_call_is_reported_once(db):
    with ChatServer(model=MODEL) as server:
        server.fail(Fault.status(401), times=5)
        denied = run(
            "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, "--new",
            stdin="hello\n", check=False,
        )  # fmt: skip
    assert denied.returncode == 5
    assert "OPENAI_API_KEY" in one_error_line(denied)


def test_in_a_terminal_a_failed_call_is_shown_whole_and_the_chat_goes_on(db, capsys):
    from conversation_memory.cli.chat import Session

    lines = iter(["hello", "hello again"])

    def typed() -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    with ChatServer(model=MODEL) as server, server.client() as client:
        server.fail(Fault.status(401), times=1)
        with Memory(db, client=client, model=MODEL) as memory:
            session = Session(memory, memory.conversation(), interactive=True, settings={})
            session.loop(typed)
            assert len(session.conversation.history()) == 2, "the second message was answered"
    err = capsys.readouterr().err
    assert err.count("the model call failed") == 1
    assert "[request id " in err, "the message is printed as text, not read as markup"


def database_at(path: Path, revision: str | None) -> str:
    """A database at head, then rewound to ``revision`` (or marked with one we don't know)."""
    Memory(path).close()
    if revision is not None:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE convmem_version SET version_num = ?", (revision,))
    return str(path)


def test_db_commands_on_outdated_and_too_new_databases(tmp_path):
    old = database_at(tmp_path / "old.db", "0001")
    new = database_at(tmp_path / "new.db", "9999")

    checked = run("db", "check", "--db", old, check=False)
    assert checked.returncode == 4
    assert "convmem db upgrade" in one_error_line(checked)

    checked = run("db", "check", "--db", new, check=False)
    assert checked.returncode == 4
    assert "newer version" in one_error_line(checked)

    # `current` reports a too-new database without advising the upgrade that refuses it.
    current = run("db", "current", "--db", new)
    assert "db upgrade" not in current.stdout
    assert "newer version" in current.stdout
    assert run_json("db", "current", "--db", new)["state"] == "too new"
    assert run_json("db", "current", "--db", old)["state"] == "outdated"
    refused = run("db", "upgrade", "--db", new, check=False)
    assert refused.returncode == 4
    one_error_line(refused)


# -- 15: ids, prefixes and titles -----------------------------------------------------


def test_an_exact_title_wins_and_an_ambiguous_prefix_lists_the_candidates(db):
    first, second = "abc1" + "0" * 28, "abc2" + "0" * 28
    imported(db, first, title="one")
    imported(db, second, title="two")
    titled = stored(db, title="abc")

    with Memory(db) as memory:
        assert memory.find("abc").id == titled, "an exact title wins over an id prefix"
        assert memory.find("abc1").id == first, "a unique prefix still names one"
        with pytest.raises(errors.AmbiguousReference) as caught:
            memory.find("ab")
        assert {c.id for c in caught.value.candidates} == {first, second}

    ambiguous = run("show", "ab", "--db", db, check=False)
    assert ambiguous.returncode == 1
    line = one_error_line(ambiguous)
    for candidate in (f"{first[:12]} 'one'", f"{second[:12]} 'two'"):
        assert candidate in line, "the candidates are listed"
    assert run_json("show", "abc", "--db", db)["conversation"]["id"] == titled


# -- 18: pipes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("export", "{id}"), ("sessions", "--json"), ("show", "{id}"), ("search", "words")],
    ids=" ".join,
)
def test_a_pipe_closed_early_ends_the_command_quietly(db, args):
    """`convmem export ID | head -c 0`: the reader is gone before anything is written."""
    conversation_id = stored(db, text="some words " * 2000)
    with subprocess.Popen(
        [CONVMEM, *(a.format(id=conversation_id) for a in args), "--db", db],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_without_keys(),
    ) as process:  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        err = process.stderr.read().decode()
        process.wait(timeout=60)
    assert err == ""
    assert process.returncode == 1


def test_piped_output_is_never_cut_to_the_terminal_width(db):
    title = "a title much longer than any eighty-column terminal would show in a table cell"
    text = "a message of many words " * 12
    conversation_id = stored(db, title=title, text=text)
    with Memory(db) as memory:
        memory.conversation(conversation_id).append({"role": "assistant", "content": "ok"})
    listing = run("sessions", "--db", db).stdout
    assert title in listing
    assert "messages" in listing
    assert MODEL in listing
    assert "…" not in listing
    shown = run("show", conversation_id, "--db", db).stdout
    assert text.strip() in shown, "a long message is printed on one line, unwrapped"
    context = run("context", conversation_id, "--db", db).stdout
    assert text.strip()[:71] + "…" in context, "the content preview whole, as in --json"


# -- 19: conventions ------------------------------------------------------------------


def test_db_works_before_the_subcommand(db):
    conversation_id = stored(db)
    assert [row["id"] for row in run_json("--db", db, "sessions")] == [conversation_id]
    assert run_json("--db", db, "db", "path")["db"] == db
    other = str(Path(db).with_name("other.db"))
    assert run_json("--db", other, "db", "path", "--db", db)["db"] == db, "the nearer one wins"


@pytest.mark.postgres
def test_postgres_urls_are_accepted_like_postgresql(pg_url):
    url = pg_url.replace("postgresql://", "postgres://", 1)
    assert url.startswith("postgres://")
    with Memory(url) as memory:
        memory.conversation(title="heroku-style").append({"role": "user", "content": "hi"})
    with Memory(pg_url) as memory:
        assert [c.title for c in memory.conversations()] == ["heroku-style"]


def test_import_reads_a_file_with_a_byte_order_mark(db, tmp_path):
    with Memory(":memory:") as memory:
        source = memory.conversation(title="from windows", model=MODEL)
        source.append({"role": "user", "content": "hi"})
        exported = source.export()
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + exported.encode("utf-8"))
    assert run_json("import", str(path), "--db", db)["title"] == "from windows"
    assert run("export", source.id, "--db", db).stdout == exported
    with Memory(":memory:") as memory:  # the library too, given text that kept the mark
        assert memory.import_conversation("\ufeff" + exported).title == "from windows"


def test_rm_and_erase_need_yes_when_stdin_is_not_a_terminal(db):
    conversation_id = stored(db, user="ann")
    for args in (("rm", conversation_id), ("erase", "--user", "ann")):
        refused = run(*args, "--db", db, stdin="y\n", check=False)
        assert refused.returncode == 1
        assert "--yes" in one_error_line(refused)
    assert [row["id"] for row in run_json("sessions", "--db", db)] == [conversation_id]
    assert run_json("rm", conversation_id, "--db", db, "--yes") == {"deleted": conversation_id}
    assert run_json("sessions", "--db", db) == []


def test_every_command_that_prints_data_takes_json():
    from conversation_memory.cli import cli

    without = set()
    for name, command in cli.commands.items():
        for sub_name, sub in getattr(command, "commands", {name: command}).items():
            if not any(param.name == "as_json" for param in sub.params):
                without.add(sub_name)
    # chat talks; export's output is JSONL already. The README says so.
    assert without == {"chat", "export"}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "except `chat` and `export`" in readme


def test_db_path_says_where_the_default_database_is(tmp_path):
    env = dict.fromkeys(("CONVMEM_DB", "OPENAI_API_KEY", "OPENAI_BASE_URL"))
    default = run_json("db", "path", env={**env, "XDG_DATA_HOME": str(tmp_path)})
    assert default == {
        "db": str(tmp_path / "conversation-memory" / "convmem.db"),
        "source": "default",
        "exists": False,
    }
    assert not (tmp_path / "conversation-memory").exists(), "nothing is created"
    chosen = str(tmp_path / "mine.db")
    named = run("db", "path", env={**env, "CONVMEM_DB": chosen})
    assert named.stdout == chosen + "\n", "only the path: `sqlite3 $(convmem db path)` works"
    assert "convmem db path" in " ".join(run("--help").stdout.split())


def test_titles_with_square_brackets_are_shown_as_typed(db):
    """A title is text, never rich markup: `[draft]` used to vanish from `sessions`."""
    title = "notes [draft] [bold]x[/bold]"
    conversation_id = stored(db, title=title, text="bracketed")
    assert title in run("sessions", "--db", db).stdout
    with Memory(db) as memory:
        memory.conversation(conversation_id).fork(at=0)
    assert f"{title} (fork of {conversation_id[:12]})" in run("sessions", "--db", db).stdout
    assert title in run("search", "bracketed", "--db", db).stdout
