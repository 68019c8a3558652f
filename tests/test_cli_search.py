"""``convmem search``: the library's search on the command line, with the manners of the
other commands (test_cli_conventions.py): one-line errors and their exit codes, a
``--json`` list, piped output never cut, and no file created by a read."""

from __future__ import annotations

import json

import pytest
from test_cli import MODEL, run, run_json, run_process

from conversation_memory import Memory

LONG = "the harbour pilot said the northern ferry leaves at dawn " * 6


@pytest.fixture
def db(tmp_path) -> str:
    """Ann's trip (and a fork of it) and Bob's note, all mentioning the ferry."""
    path = str(tmp_path / "search.db")
    with Memory(path, model=MODEL) as memory:
        trip = memory.conversation(user="ann", title="trip planning")
        trip.extend([
            {"role": "user", "content": "Book the ferry from Oslo to Kiel."},
            {"role": "assistant", "content": LONG.strip()},
        ])  # fmt: skip
        fork = trip.fork(at=0, title="by train instead")
        fork.append({"role": "assistant", "content": "No ferry: the night train to Kiel."})
        trip.append({"role": "user", "content": "And the ferry back from Kiel?"})
        memory.conversation(user="bob", title="notes").append(
            {"role": "user", "content": "ferry timetable for Bergen"}
        )
    return path


def test_json_lists_the_hits_as_the_library_returns_them(db):
    hits = run_json("search", "ferry", "Kiel", "--db", db)
    assert len(hits) == 5, "every user's conversations: the shared message found once"
    with Memory(db, create=False) as memory:
        expected = memory.search("ferry Kiel", all_users=True, limit=20)
    assert [(h["conversation_id"], h["position"]) for h in hits] == [
        (hit.conversation_id, hit.position) for hit in expected
    ]
    first = hits[0]
    assert set(first) == {
        "conversation_id", "title", "position", "role", "message", "text", "created_at",
        "score", "snippet",
    }  # fmt: skip
    assert first["message"] == {"role": first["role"], "content": first["text"]}
    assert first["created_at"].endswith("+00:00")
    assert "**" in first["snippet"]


def test_user_conversation_and_limit_narrow_it(db):
    assert {h["title"] for h in run_json("search", "ferry", "--user", "bob", "--db", db)} == {
        "notes"
    }
    assert run_json("search", "ferry", "--user", "carol", "--db", db) == []
    # One conversation: a fork finds the history it shares, not what came after.
    in_fork = run_json("search", "ferry", "-c", "by train instead", "--db", db)
    assert sorted((h["title"], h["position"]) for h in in_fork) == [
        ("by train instead", 1),
        ("trip planning", 0),
    ]
    in_trip = run_json("search", "ferry", "--conversation", "trip planning", "--db", db)
    assert sorted(h["position"] for h in in_trip) == [0, 1, 2]
    assert len(run_json("search", "ferry", "--limit", "2", "--db", db)) == 2
    assert len(run_json("search", "ferry", "-n", "1", "--all", "--db", db)) == 5
    # --conversation with --user looks only among that user's conversations.
    hidden = run("search", "ferry", "-c", "notes", "--user", "ann", "--db", db, check=False)
    assert hidden.returncode == 3


def test_piped_output_is_plain_and_whole(db):
    shown = run_process("search", "pilot", "--db", db).stdout
    assert "trip planning" in shown
    assert "assistant" in shown
    assert "**pilot**" in shown, "into a pipe the matched words keep their marks"
    assert "\x1b[" not in shown
    snippet = next(line for line in shown.splitlines() if "**pilot**" in line)
    assert "northern ferry" in snippet, "the snippet is not cut to the terminal's width"


def test_in_a_terminal_the_matched_words_are_highlighted(db):
    shown = run("search", "pilot", "--db", db, env={"FORCE_COLOR": "1", "COLUMNS": "200"}).stdout
    assert "**" not in shown
    assert "\x1b[1;33mpilot\x1b[0m" in shown


def test_nothing_found_is_not_an_error(db):
    result = run("search", "zeppelin", "--db", db)
    assert "no stored message holds any of the words of 'zeppelin'" in result.stdout
    assert run_json("search", "***", "--db", db) == []


def test_errors_are_one_line_with_their_exit_codes(db, tmp_path):
    def failed(*args: str, code: int) -> str:
        result = run(*args, check=False)
        assert result.returncode == code, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("convmem: error: ")
        return result.stderr

    assert "limit must be a whole number from 1 to 1000" in failed(
        "search", "ferry", "--limit", "1001", "--db", db, code=1
    )
    assert "no conversation" in failed("search", "ferry", "-c", "nope", "--db", db, code=3)
    missing = tmp_path / "missing.db"
    assert "no database" in failed("search", "ferry", "--db", str(missing), code=4)
    assert not missing.exists(), "a read-only command creates no file"
    assert run("search", "--db", db, check=False).returncode == 2, "TEXT is required"


@pytest.mark.postgres
def test_on_postgresql(pg_url):
    with Memory(pg_url, model=MODEL) as memory:
        memory.conversation(title="pg").append({"role": "user", "content": "a ferry to Kiel"})
    hits = run_json("search", "kiel", "--db", pg_url)
    assert [(h["title"], h["text"]) for h in hits] == [("pg", "a ferry to Kiel")]
    assert hits[0]["snippet"].endswith("ferry to **Kiel**")


def test_words_that_look_like_options_go_after_a_double_dash(db):
    with Memory(db) as memory:
        memory.conversation(user="ann").append({"role": "user", "content": "run it with -v"})
    shown = json.loads(run("search", "--json", "--db", db, "--", "-v").stdout)
    assert [hit["text"] for hit in shown] == ["run it with -v"]
