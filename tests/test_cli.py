"""``convmem`` through its entry point, against real SQLite files.

Every command runs through ``conversation_memory.cli:main``'s command group
with click's runner (in-process: a subprocess costs a second of imports per
call), and the chat, the errors, Ctrl-C and the help also run as subprocesses
of the console script pip installed, the way a user runs them. ``--json``
output is parsed and checked against what the library reports. Chats talk to
``conversation_memory.testing.ChatServer`` over real HTTP (``--base-url``).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conversation_memory import Memory
from conversation_memory.cli import cli
from conversation_memory.testing import ChatServer, Fault

CONVMEM = str(Path(sys.executable).with_name("convmem"))
MODEL = "gpt-4o-mini"


def env_without_keys(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CONVMEM_"))}
    env.update(extra)
    env["COLUMNS"] = "160"
    return env


def run(*args: str, stdin: str | None = None, check: bool = True, env=None):
    """``convmem ARGS`` in this process, through the same command group as the script."""
    runner = CliRunner(
        env=env or {k: None for k in os.environ if k.startswith(("OPENAI_", "CONVMEM_"))}
    )
    result = runner.invoke(cli, list(args), input=stdin, prog_name="convmem")
    if check and result.exit_code != 0:
        raise AssertionError(
            f"convmem {' '.join(args)} exited {result.exit_code}:\n"
            f"{result.stderr}\n{result.exception!r}"
        )
    result.returncode = result.exit_code
    return result


def run_process(*args: str, stdin: str | None = None, check: bool = True, env=None, timeout=60):
    """``convmem ARGS`` as a subprocess of the installed console script."""
    done = subprocess.run(
        [CONVMEM, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or env_without_keys(),
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"convmem {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def run_json(*args: str, **kwargs):
    return json.loads(run(*args, "--json", **kwargs).stdout)


@pytest.fixture
def server():
    with ChatServer(window=128_000, model=MODEL) as server:
        yield server


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "cli.db")


def chat(db: str, server: ChatServer, *args: str, lines: list[str]):
    return run(
        "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, *args,
        stdin="".join(f"{line}\n" for line in lines),
    )  # fmt: skip


def test_the_entry_point_is_installed():
    assert Path(CONVMEM).exists(), "pip install -e . creates the convmem script"
    assert "chat" in run_process("--help").stdout


def every_command():
    for name, command in sorted(cli.commands.items()):
        yield (name,)
        for sub in sorted(getattr(command, "commands", {})):
            yield (name, sub)


@pytest.mark.parametrize("words", list(every_command()), ids=" ".join)
def test_every_command_has_help(words):
    done = run(*words, "--help")
    command = cli
    for word in words:
        command = command.commands[word]
    assert len((command.help or "").strip()) > 20, f"{words} needs help text"
    assert "Usage: convmem " + " ".join(words) in done.stdout


def test_piped_chat_stores_turns_and_resumes_the_latest(db, server):
    done = run_process(
        "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, "--new",
        "--title", "trip", stdin="hello there\n\nand again\n",
    )  # fmt: skip
    replies = [line for line in done.stdout.splitlines() if line]
    assert len(replies) == 2, done.stdout
    assert "you ›" not in done.stdout, "no prompt when stdin is not a terminal"

    # No id, no --new: the most recent conversation goes on.
    chat(db, server, lines=["third message"])
    [listed] = run_json("sessions", "--db", db)
    assert listed["title"] == "trip"
    assert listed["message_count"] == 6
    with Memory(db) as memory:
        conversation = memory.conversation(listed["id"])
        history = conversation.history()
        assert [m["role"] for m in history] == ["user", "assistant"] * 3
        assert history[4]["content"] == "third message"
        assert listed["tokens"] == sum(e.tokens for e in conversation.entries())

    # Every request the server saw was valid and carried the system prompt.
    assert not server.rejections
    assert all(r.body["messages"][0]["role"] == "system" for r in server.chat_requests)


def test_sessions_lists_newest_first_and_filters_by_user(db, server):
    chat(db, server, "--new", "--title", "first", "--user", "ann", lines=["hi"])
    chat(db, server, "--new", "--title", "second", "--user", "bob", lines=["hi"])
    rows = run_json("sessions", "--db", db)
    assert [r["title"] for r in rows] == ["second", "first"]
    assert [r["user"] for r in run_json("sessions", "--db", db, "--user", "ann")] == ["ann"]
    assert [r["title"] for r in run_json("sessions", "--db", db, "--limit", "1")] == ["second"]
    capped = run("sessions", "--db", db, "--limit", "1").stdout
    assert "the 1 most recent of 2" in capped
    assert "first" not in capped
    assert len(run_json("sessions", "--db", db, "--limit", "1", "--all")) == 2
    table = run("sessions", "--db", db).stdout
    assert "second" in table
    assert "first" in table
    assert rows[0]["id"][:12] in table


def test_show_marks_summaries_where_they_sit(db, server):
    lines = [f"message number {i} with some words to fill the window" for i in range(12)]
    chat(db, server, "--new", "--budget", "300", "--strategy", "summary", lines=lines)
    [row] = run_json("sessions", "--db", db)
    shown = run_json("show", row["id"][:8], "--db", db)
    assert len(shown["messages"]) == 24
    assert [m["position"] for m in shown["messages"]] == list(range(24))
    assert shown["summaries"], "a 300-token budget over 24 messages forces a summary"
    text = run("show", row["id"], "--db", db).stdout
    summary = shown["summaries"][-1]
    # The context lists the summary exactly where the request carries it.
    context = run_json("context", row["id"], "--db", db)
    kinds = [p["kind"] for p in context["parts"]]
    assert "summary" in kinds
    assert [p["role"] for p in context["parts"]] == [m["role"] for m in context["messages"]]
    at = kinds.index("summary")
    assert context["messages"][at]["content"].startswith("Summary of the earlier conversation")
    assert f"summary of messages {summary['start']}–{summary['end']}" in text


def test_context_reports_every_part_and_adds_up(db, server):
    chat(
        db,
        server,
        "--new",
        "--budget",
        "400",
        lines=[f"turn {i} " + "word " * 30 for i in range(8)],
    )
    [row] = run_json("sessions", "--db", db)
    report = run_json("context", row["id"], "--db", db)
    parts, r = report["parts"], report["report"]
    assert sum(p["tokens"] for p in parts) + r["priming"] == r["total"]
    assert r["total"] <= r["limit"] <= 400
    assert parts[0]["kind"] == "system"
    assert len(report["messages"]) == len(parts)
    assert report["estimated_cost"]["prompt"] > 0
    text = run("context", row["id"], "--db", db).stdout
    for word in ("reply reserve", "window", "est. cost", "% of the budget"):
        assert word in text
    # Another strategy is shown without changing the conversation.
    windowed = run_json("context", row["id"], "--db", db, "--strategy", "window:2")
    assert windowed["report"]["strategy"] == "window:2"
    assert [p["kind"] for p in windowed["parts"]].count("message") == 4, "two turns"
    assert run_json("context", row["id"], "--db", db)["report"]["strategy"] != "window:2"


def test_usage_lists_calls_and_totals(db, server):
    chat(db, server, "--new", lines=["one", "two"])
    [row] = run_json("sessions", "--db", db)
    usage = run_json("usage", row["id"], "--db", db)
    assert [c["kind"] for c in usage["calls"]] == ["chat", "chat"]
    assert usage["total"]["calls"] == 2
    assert usage["total"]["prompt_tokens"] == sum(c["prompt_tokens"] for c in usage["calls"])
    assert usage["total"]["cost"] == pytest.approx(sum(c["cost"] for c in usage["calls"]))
    assert "total" in run("usage", row["id"], "--db", db).stdout


def test_export_import_fork_rm_erase(db, server, tmp_path):
    chat(db, server, "--new", "--title", "orig", "--user", "ann", lines=["a", "b"])
    [row] = run_json("sessions", "--db", db)
    out = tmp_path / "conv.jsonl"
    run("export", row["id"], "--db", db, "-o", str(out))
    assert run("export", row["id"], "--db", db).stdout == out.read_text()
    with pytest.raises(AssertionError, match="exited 1"):
        run("import", str(out), "--db", db)  # same id: refused, nothing written
    copy = run_json("import", str(out), "--db", db, "--new-id")
    piped = run_json("import", "-", "--db", db, "--new-id", stdin=out.read_text())
    assert piped["message_count"] == 4
    run("rm", piped["id"], "--db", db, "--yes")
    assert copy["message_count"] == 4
    assert copy["id"] != row["id"]
    assert len(run_json("sessions", "--db", db)) == 2

    fork = run_json("fork", row["id"], "--db", db, "--at", "1", "--title", "branch")
    assert fork["message_count"] == 2
    assert fork["forked_from"] == row["id"]
    chat(db, server, fork["id"], lines=["new direction"])
    assert (
        run_json("show", "branch", "--db", db)["messages"][2]["message"]["content"]
        == "new direction"
    )

    run("rm", row["id"], "--db", db, "--yes")
    ids = {r["id"] for r in run_json("sessions", "--db", db)}
    assert row["id"] not in ids
    assert fork["id"] in ids
    assert len(run_json("show", fork["id"], "--db", db)["messages"]) == 4, (
        "the fork keeps its messages"
    )

    erased = run_json("erase", "--user", "ann", "--db", db, "--yes")
    assert erased == {"user": "ann", "conversations": 2}
    assert run_json("sessions", "--db", db) == []


def test_db_commands(db, tmp_path):
    Memory(db).close()
    current = run_json("db", "current", "--db", db)
    assert current["up_to_date"]
    assert current["current"] == current["head"]
    assert run_json("db", "upgrade", "--db", db) == {
        "db": current["db"], "from": current["head"], "to": current["head"]
    }  # fmt: skip
    assert run_json("db", "check", "--db", db)["differences"] == []
    missing = run("db", "current", "--db", str(tmp_path / "nope.db"), check=False)
    assert missing.returncode == 4
    assert "no database at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()


READ_ONLY = [
    ("sessions",),
    ("show", "x"),
    ("context", "x"),
    ("usage", "x"),
    ("export", "x"),
    ("fork", "x"),
    ("rm", "x", "--yes"),
    ("erase", "--user", "ann", "--yes"),
]


@pytest.mark.parametrize("words", READ_ONLY, ids=lambda words: words[0])
def test_commands_that_only_read_create_no_database(tmp_path, words):
    """Only a command that writes may create a database (or its folder)."""
    missing = tmp_path / "no" / "such" / "folder" / "x.db"
    for target in (tmp_path / "x.db", missing):
        done = run(*words, "--db", str(target), check=False)
        assert done.returncode == 4, done.stderr
        assert done.stderr.count("\n") == 1
        assert f"there is no database at {target}" in done.stderr
    assert list(tmp_path.iterdir()) == []


HEADER = '{"convmem": 1, "type": "conversation", "id": "c1", "created_at": "2026-01-01T00:00:00", '


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (HEADER + '"updated_at": "2026-01-01T00:00:00"}\nnot json\n', "line 2"),
        (HEADER + '"updated_at": "2026-01-01T00:00:00", "model": "no-such-model"}\n', "no-such"),
    ],
    ids=["bad line", "unknown model"],
)
def test_a_failed_import_creates_no_database(tmp_path, text, error):
    target = tmp_path / "new" / "x.db"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    done = run("import", str(bad), "--db", str(target), check=False)
    assert done.returncode == 1
    assert error in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_a_relative_sqlite_url_is_refused_with_the_right_forms(tmp_path, monkeypatch):
    """``sqlite:///tmp/x.db`` is SQLAlchemy's spelling of ./tmp/x.db, not of /tmp/x.db."""
    export = tmp_path / "c.jsonl"
    with Memory(":memory:") as memory:
        export.write_text(memory.conversation().export())
    monkeypatch.chdir(tmp_path)
    done = run("import", str(export), "--db", "sqlite:///tmp/x.db", check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "sqlite:////tmp/x.db" in done.stderr  # the absolute form
    assert "'tmp/x.db'" in done.stderr  # or the path itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("sub", ["current", "upgrade", "check"])
def test_db_commands_refuse_another_applications_file_untouched(tmp_path, sub):
    """`convmem db upgrade` must not write our tables into another program's SQLite file
    (nor `db current` switch it to WAL while reading its revision)."""
    import sqlite3

    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    done = run("db", sub, "--db", str(path), check=False)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "another application" in done.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_errors_are_one_line_with_exit_codes(db, tmp_path, server):
    Memory(db).close()
    missing = run_process("show", "nope", "--db", db, check=False)
    assert missing.returncode == 3
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
    assert "convmem sessions" in missing.stderr
    debug = run_process("show", "nope", "--db", db, "--debug", check=False)
    assert debug.returncode == 3
    assert "Traceback" in debug.stderr

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    broken = run("sessions", "--db", str(junk), check=False)
    assert broken.returncode == 4
    assert "Traceback" not in broken.stderr
    assert junk.read_bytes() == b"this is not a database" * 100, "left untouched"

    bad = run("context", "x", "--db", db, "--budget", "0", check=False)
    assert bad.returncode == 2
    assert "--budget" in bad.stderr

    server.fail(Fault.status(401), times=5)
    denied = run_process(
        "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, "--new",
        stdin="hello\n", check=False,
    )  # fmt: skip
    assert denied.returncode == 5
    assert "OPENAI_API_KEY" in denied.stderr
    assert run_json("sessions", "--db", db) == [], "a failed first turn stores nothing"


def test_ctrl_c_stops_the_reply_and_keeps_the_chat(db, server):
    server.fail(Fault.drip(0.2, chunk_bytes=8))
    process = subprocess.Popen(
        [CONVMEM, "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, "--new"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_keys(),
    )
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write("tell me a long story\n")
    process.stdin.flush()
    deadline = time.monotonic() + 30
    while not server.chat_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # a few pieces are on their way
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    _out, err = process.communicate("are you still there?\n", timeout=30)
    assert process.returncode == 0, err
    assert "stopped; the partial reply was stored as incomplete" in err
    [row] = run_json("sessions", "--db", db)
    shown = run_json("show", row["id"], "--db", db)["messages"]
    assert [m["message"]["role"] for m in shown] == ["user", "assistant", "user", "assistant"]
    assert shown[1]["complete"] is False
    assert shown[3]["complete"] is True


def test_chat_without_a_key_explains_when_the_local_model_is_missing(db, tmp_path):
    # A Python without the local extra: sys.modules[name] = None makes find_spec and
    # import both report the package missing, as on a machine that never installed it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['xllamacpp'] = None\n")
    done = run_process("chat", "--db", db, "--new", stdin="hi\n", check=False,
               env=env_without_keys(PYTHONPATH=str(site)))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1
    assert 'pip install "conversation-memory[local]"' in done.stderr
    assert "OPENAI_API_KEY" in done.stderr


def read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    """Read a pty until ``marker`` shows up (or fail with what came)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} in {seen.decode(errors='replace')[-2000:]}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_interactive_chat_in_a_terminal(db, server):
    """In a real terminal: banner, prompt, streamed reply, in-chat commands, Ctrl-D."""
    main, child = pty.openpty()
    process = subprocess.Popen(
        [CONVMEM, "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL,
         "--new", "--title", "tty"],
        stdin=child, stdout=child, stderr=child, env=env_without_keys(TERM="dumb"),
        close_fds=True,
    )  # fmt: skip
    os.close(child)
    try:
        assert b"/help for commands" in read_until(main, b"you \xe2\x80\xba ")
        os.write(main, b"hello from a terminal\r")
        read_until(main, b"you \xe2\x80\xba ")
        os.write(main, b"/help\r")
        assert b"/context" in read_until(main, b"you \xe2\x80\xba ")
        os.write(main, b"/context\r")
        assert b"reply reserve" in read_until(main, b"you \xe2\x80\xba ")
        os.write(main, b"/nonsense\r")
        assert b"unknown command" in read_until(main, b"you \xe2\x80\xba ")
        os.write(main, b"\x04")  # Ctrl-D leaves
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)
    [row] = run_json("sessions", "--db", db)
    assert row["title"] == "tty"
    assert row["message_count"] == 2


def test_every_command_through_the_installed_script(db, server, tmp_path):
    """Each command once as a subprocess of the `convmem` script, --json parsed."""
    run_process(
        "chat", "--db", db, "--base-url", server.base_url, "--model", MODEL, "--new",
        "--title", "script", stdin="one\ntwo\n",
    )  # fmt: skip
    [row] = json.loads(run_process("sessions", "--db", db, "--json").stdout)
    ref = row["id"][:12]
    assert len(json.loads(run_process("show", ref, "--db", db, "--json").stdout)["messages"]) == 4
    context = json.loads(run_process("context", ref, "--db", db, "--json").stdout)
    assert context["report"]["total"] == sum(p["tokens"] for p in context["parts"]) + 3
    assert len(json.loads(run_process("usage", ref, "--db", db, "--json").stdout)["calls"]) == 2
    exported = tmp_path / "x.jsonl"
    run_process("export", ref, "--db", db, "-o", str(exported))
    copy = json.loads(run_process("import", str(exported), "--db", db, "--new-id", "--json").stdout)
    fork = json.loads(run_process("fork", ref, "--db", db, "--at", "0", "--json").stdout)
    assert fork["message_count"] == 1
    run_process("rm", copy["id"], "--db", db, "--yes")
    assert len(json.loads(run_process("sessions", "--db", db, "--json").stdout)) == 2
    assert json.loads(run_process("db", "check", "--db", db, "--json").stdout)["differences"] == []
    assert json.loads(run_process("db", "current", "--db", db, "--json").stdout)["up_to_date"]
    lab = json.loads(
        run_process("lab", "--turns", "20", "-s", "truncate", "-b", "300", "--json").stdout
    )
    assert lab["runs"][0]["strategy"] == "truncate"
    erased = json.loads(
        run_process("erase", "--user", "default", "--db", db, "--yes", "--json").stdout
    )
    assert erased["conversations"] == 2


def test_an_outdated_database_says_what_to_run_and_db_upgrade_runs_it(tmp_path):
    from conversation_memory.store import migrate
    from conversation_memory.store.database import (
        Database,
        create_sqlite_file,
        make_engine,
        parse_target,
    )

    path = tmp_path / "old.db"
    create_sqlite_file(path)
    target = parse_target(path)
    old = Database(target, make_engine(target))
    migrate.upgrade(old, "0001")
    old.dispose()

    refused = run("sessions", "--db", str(path), check=False)
    assert refused.returncode == 4
    assert "convmem db upgrade" in refused.stderr
    assert run_json("db", "current", "--db", str(path))["current"] == "0001"
    upgraded = run_json("db", "upgrade", "--db", str(path))
    assert (upgraded["from"], upgraded["to"]) == ("0001", migrate.HEAD)
    assert run_json("sessions", "--db", str(path)) == []


def test_listing_commands_do_not_import_the_sdk(db):
    """`convmem sessions` must start fast: the openai SDK (about a second) stays unloaded."""
    Memory(db).close()
    script = (
        "import sys; from conversation_memory.cli import main; sys.argv = ['convmem', "
        f"'sessions', '--db', {db!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('openai' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env=env_without_keys(),
    )  # fmt: skip
    assert done.stdout.splitlines()[-1] == "False", done.stderr


def test_context_counts_what_the_summary_represents_as_covered(db):
    """The summary strategy re-sends the newest turns it already covers (on purpose: the
    budget stays full between folds). What it represents is covered, not left out."""
    from conversation_memory.testing import RecordingSummarizer

    with Memory(db, summarizer=RecordingSummarizer(), compaction="manual") as memory:
        chat = memory.conversation(model=MODEL, strategy="summary", budget=400)
        for n in range(25):
            words = "word " * 12
            chat.extend(
                [
                    {"role": "user", "content": f"question {n} {words}"},
                    {"role": "assistant", "content": f"answer {n} {words}"},
                ]
            )
        assert chat.compact().summaries
        conversation_id = chat.id
    context = run_json("context", conversation_id, "--db", db)
    summary = next(p for p in context["parts"] if p["kind"] == "summary")
    start, end = map(int, summary["position"].split("-"))
    sent = {p["position"] for p in context["parts"] if p["kind"] == "message"}
    assert min(sent) <= end, "the newest turns sent raw overlap the summary"
    r = context["report"]
    assert r["covered"] == (end - start + 1) - len({p for p in sent if p <= end})
    assert r["overlap"] == len({p for p in sent if start <= p <= end})
    assert r["dropped"] == 0
    text = run("context", conversation_id, "--db", db).stdout
    assert "left out" not in text
    assert f"{r['covered']} message(s) are represented by the summary" in text
    assert "also sent as they are" in text
