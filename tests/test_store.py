"""Opening databases and migrating them: what is accepted, what is refused untouched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat

import pytest
import sqlalchemy as sa

from conversation_memory import (
    AsyncMemory,
    ConfigurationError,
    Memory,
    NotADatabase,
    SchemaOutdated,
    SchemaTooNew,
    StoreError,
    admin,
)
from conversation_memory.store import migrate
from conversation_memory.store.database import Database, make_engine, parse_target
from conversation_memory.store.schema import VERSION_TABLE


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_file_is_created_at_head_owner_only(tmp_path):
    path = tmp_path / "sub" / "chats.db"
    with Memory(path) as memory:
        assert migrate.current(memory.database) == migrate.head_revision()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_sqlite_connections_get_the_pragmas(tmp_path):
    with Memory(tmp_path / "c.db") as memory, memory.database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_write_transactions_begin_immediate(tmp_path):
    """A second writer queues on the lock instead of failing with BUSY_SNAPSHOT."""
    path = tmp_path / "c.db"
    with Memory(path, busy_timeout_ms=100) as memory:
        db = memory.database
        with db.write():
            other = sqlite3.connect(path, timeout=0)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"hello, this is a text file and not a database at all", "not a SQLite"),
        (b"SQLite format 3\x00" + b"\xff" * 4000, "damaged"),
    ],
)
def test_foreign_files_are_refused_untouched(tmp_path, content, match):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    before = digest(path)
    with pytest.raises(NotADatabase, match=match):
        Memory(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def test_directory_is_refused(tmp_path):
    with pytest.raises(NotADatabase, match="directory"):
        Memory(tmp_path)


def test_another_applications_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('keep me')")
    con.commit()
    con.close()
    before = digest(path)
    with pytest.raises(NotADatabase, match="another application"):
        Memory(path)
    assert digest(path) == before


def _wal_file(path, *statements):
    """A SQLite file in WAL mode (as most applications leave theirs), closed cleanly."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def _damaged_wal_file(path):
    _wal_file(path, "CREATE TABLE notes (body TEXT)")
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xa5" * 3996  # the schema page, scribbled over; the header stays
    path.write_bytes(bytes(data))


def _rollback_journal_file(path):
    """A table-less file in SQLite's default (rollback journal) mode, user_version set."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 3")
    con.close()


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: _wal_file(p, "CREATE TABLE notes (body TEXT)"), "another application"),
        (_damaged_wal_file, "damaged"),
        (lambda p: _wal_file(p, "PRAGMA user_version = 7"), "another application"),
        (lambda p: _wal_file(p, "PRAGMA application_id = 1234"), "another application"),
        (_rollback_journal_file, "another application"),
    ],
    ids=["foreign", "damaged", "user_version", "application_id", "rollback-journal"],
)
def test_refused_sqlite_files_get_no_side_files(tmp_path, make, error):
    """Nothing appears beside a refused file: SQLite opens a WAL-mode file's -wal and
    -shm even to read it, so the check must not open it that way."""
    path = tmp_path / "app.db"
    make(path)
    before = digest(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    with pytest.raises(NotADatabase, match=error):
        Memory(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "c.db"
    Memory(path).close()
    con = sqlite3.connect(path)
    con.execute(f"UPDATE {VERSION_TABLE} SET version_num = 'from_the_future'")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = digest(path)
    with pytest.raises(SchemaTooNew, match="newer version"):
        Memory(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]


def test_older_schema_says_what_to_run(tmp_path):
    path = tmp_path / "c.db"
    db = _database(str(path))
    migrate.upgrade(db, "0001")
    db.dispose()
    with pytest.raises(SchemaOutdated, match="convmem db upgrade"):
        Memory(path)
    with Memory(path, upgrade=True) as memory:
        assert migrate.current(memory.database) == migrate.head_revision() != "0001"
        memory.conversation().append({"role": "user", "content": "works"})


def test_admin_locates_reads_upgrades_and_checks_a_database(tmp_path):
    """``conversation_memory.admin``, the public door of ``convmem db``."""
    path = tmp_path / "c.db"
    env = {"CONVMEM_DB": str(path)}
    assert admin.locate(env=env) == admin.Location(str(path), "CONVMEM_DB", False)
    with pytest.raises(StoreError, match="there is no database"):
        admin.revision(env=env)
    assert not path.exists(), "nothing is created"
    db = _database(str(path))
    migrate.upgrade(db, "0001")
    db.dispose()
    assert admin.locate(path) == admin.Location(str(path), "given", True)
    found = admin.revision(path)
    assert (found.current, found.state, found.up_to_date) == ("0001", "outdated", False)
    with pytest.raises(SchemaOutdated):
        admin.check(path)
    lines: list[str] = []
    done = admin.upgrade(env=env, progress=lines.append)
    assert (done.db, done.before, done.after) == (found.db, "0001", migrate.head_revision())
    assert str(path) in found.db
    assert admin.revision(path).state == "up to date"
    assert admin.check(path).differences == []
    assert admin.upgrade(path).before == migrate.head_revision()  # a no-op
    server = admin.locate("postgresql://postgres:secret@127.0.0.1:9/test")
    assert "secret" not in server.db
    assert "127.0.0.1:9/test" in server.db
    assert server.exists is None, "a server is not looked at"


def test_unsupported_urls_and_bad_values(tmp_path):
    with pytest.raises(ConfigurationError, match="not supported"):
        Memory("mysql://root@localhost/x")
    with pytest.raises(ConfigurationError, match="file path or a database URL"):
        Memory("  ")


def _database(url: str) -> Database:
    target = parse_target(url)
    return Database(target, make_engine(target))


def test_migrations_blank_to_head_twice_and_check(db_url):
    with Memory(db_url) as memory:
        db = memory.database
        assert migrate.current(db) == migrate.head_revision()
        tables_before = set(sa.inspect(db.engine).get_table_names())
        assert migrate.upgrade(db) == migrate.head_revision()  # a no-op
        assert set(sa.inspect(db.engine).get_table_names()) == tables_before
        assert migrate.check(db) == []


def test_single_head():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    assert len(scripts.get_heads()) == 1
    assert scripts.get_heads() == [migrate.HEAD], "bump migrate.HEAD with a new migration"


def test_every_migration_says_why():
    for path in migrate.script_location().joinpath("versions").glob("*.py"):
        if path.name != "__init__.py":
            assert "Why:" in path.read_text(), path


def test_saved_schema_with_data_upgrades_and_keeps_it(tmp_path):
    """Data written at the oldest revision survives ``upgrade`` to head."""
    path = tmp_path / "old.db"
    db = _database(str(path))
    migrate.upgrade(db, "0001")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO conversations (id, user_id, model, counter, created_at, updated_at, "
            "next_position, message_count, total_tokens) VALUES ('c1', 'default', "
            "'gpt-4o-mini', 'tiktoken:o200k_base', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:00', 1, 1, 9)"
        )
        conn.exec_driver_sql(
            "INSERT INTO messages (conversation_id, position, role, content, tokens, "
            "created_at, complete, pinned) VALUES ('c1', 0, 'user', 'old words', 9, "
            "'2026-01-01 00:00:00', 1, 0)"
        )
    db.dispose()
    with Memory(path, upgrade=True) as memory:
        assert memory.conversation("c1").history() == [{"role": "user", "content": "old words"}]


def test_unreachable_server_is_a_store_error():
    with pytest.raises(StoreError, match="cannot use the database"):
        Memory("postgresql://postgres@127.0.0.1:9/test")


def test_a_read_sees_one_snapshot(db_url):
    """A commit landing between two statements of one read is not half-seen.

    Building a context reads the conversation row, then the tail: if the tail
    saw a turn the row did not, positions would collide. Both kinds of read
    transaction (the DBAPI cursor of the hot path and the Core connection)
    must see the database as it was at their first statement.
    """
    count = "SELECT count(*) FROM messages"
    with Memory(db_url) as memory, Memory(db_url) as other:
        chat = memory.conversation()
        chat.append({"role": "user", "content": "first"})
        writer = other.conversation(chat.id)
        with memory.database.cursor(write=False) as cur:
            cur.execute(count)
            before = cur.fetchone()[0]
            writer.append({"role": "assistant", "content": "committed meanwhile"})
            cur.execute(count)
            assert cur.fetchone()[0] == before == 1
        with memory.database.read() as conn:
            before = conn.exec_driver_sql(count).scalar_one()
            writer.append({"role": "user", "content": "and another"})
            assert conn.exec_driver_sql(count).scalar_one() == before == 2
        assert len(chat) == 3


def test_create_false_opens_only_an_existing_database(tmp_path):
    for missing in (tmp_path / "x.db", tmp_path / "no" / "folder" / "x.db"):
        with pytest.raises(StoreError, match=f"there is no database at {missing}"):
            Memory(missing, create=False)
    assert list(tmp_path.iterdir()) == []
    _rollback_journal_file(tmp_path / "empty.db")  # a valid SQLite file without tables...
    con = sqlite3.connect(tmp_path / "empty.db")
    con.execute("PRAGMA user_version = 0")  # ...and unclaimed: ours to fill, but only on request
    con.close()
    before = digest(tmp_path / "empty.db")
    with pytest.raises(StoreError, match="there is no database at"):
        Memory(tmp_path / "empty.db", create=False)
    assert digest(tmp_path / "empty.db") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    with pytest.raises(StoreError, match="there is no database at"):
        Memory(":memory:", create=False)
    with pytest.raises(StoreError, match="there is no database at"):
        asyncio.run(AsyncMemory.open(tmp_path / "x.db", create=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    Memory(tmp_path / "x.db").close()
    with Memory(tmp_path / "x.db", create=False) as memory:
        assert memory.conversations() == []


def test_create_false_creates_no_tables_on_a_server(pg_url):
    with pytest.raises(StoreError, match="there is no database at"):
        Memory(pg_url, create=False)
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_a_relative_sqlite_url_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"sqlite:////tmp/x\.db"):
        Memory("sqlite:///tmp/x.db")
    assert list(tmp_path.iterdir()) == []
    with Memory(f"sqlite:///{tmp_path / 'abs.db'}") as memory:  # four slashes: absolute
        assert memory.database.target.path == tmp_path / "abs.db"


def test_durability_chooses_how_often_sqlite_syncs(tmp_path):
    """ "full" (the default) syncs every commit; "normal" at checkpoints only (a stored
    turn survives a crash of the process, not a power cut; see test_crash.py)."""
    for durability, mode in ((None, 2), ("full", 2), ("normal", 1)):
        options = {} if durability is None else {"durability": durability}
        with Memory(tmp_path / f"{durability}.db", **options) as memory:
            memory.conversation().append({"role": "user", "content": "hello"})
            with memory.database.cursor(write=False) as cur:
                cur.execute("PRAGMA synchronous")
                assert cur.fetchone()[0] == mode, durability
    with pytest.raises(ConfigurationError, match="durability"):
        Memory(tmp_path / "bad.db", durability="fast")
    with pytest.raises(ConfigurationError, match="durability"):
        AsyncMemory(tmp_path / "bad.db", durability="fast")
    assert not (tmp_path / "bad.db").exists()


def _fill_at_0002(url: str, *, messages: int = 3) -> Database:
    """A database as version 0002 left it, with a conversation's messages of every kind."""
    db = _database(url)
    migrate.upgrade(db, "0002")
    function = {"name": "lookup", "arguments": json.dumps({"q": "otter"})}
    call = json.dumps([{"id": "c1", "type": "function", "function": function}])
    rows = [
        {"p": 0, "role": "user", "content": "the old heron", "parts": None, "calls": None},
        {"p": 1, "role": "assistant", "content": None,
         "parts": '[{"type":"text","text":"an old kestrel"}]', "calls": None},
        {"p": 2, "role": "assistant", "content": None, "parts": None, "calls": call},
    ] + [
        {"p": n, "role": "user", "content": f"filler {n}", "parts": None, "calls": None}
        for n in range(3, messages)
    ]  # fmt: skip
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO conversations (id, user_id, model, counter, created_at, updated_at, "
                "next_position, message_count, total_tokens) VALUES ('c1', 'default', "
                "'gpt-4o-mini', 'tiktoken:o200k_base', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00', :n, :n, :n)"
            ),
            {"n": len(rows)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO messages (conversation_id, position, role, content, parts, "
                "tool_calls, tokens, created_at, complete, pinned) VALUES ('c1', :p, :role, "
                ":content, :parts, :calls, 1, '2026-01-01 00:00:00', true, false)"
            ),
            rows,
        )
    return db


def _search_words(url: str, text: str) -> list[int]:
    """Positions of the messages ``Memory.search`` finds (the rows are the default user's)."""
    with Memory(url) as memory:
        return sorted(h.position for h in memory.search(text))


def test_search_index_backfills_a_database_made_at_0002(db_url):
    """Migration 0003 indexes the messages already stored, saying how far it got;
    upgrading again does nothing, and the models still match the schema."""
    from conversation_memory.store import search

    db = _fill_at_0002(db_url)
    lines: list[str] = []
    assert migrate.upgrade(db, progress=lines.append) == migrate.HEAD
    assert lines[-1] == "search index: 3 of 3 messages"
    assert _search_words(db_url, "heron kestrel otter lookup") == [0, 1, 2]
    with Memory(db_url) as memory:  # the hits carry the messages as 0002 stored them
        (call,) = memory.search("otter")
        assert call.message["tool_calls"][0]["function"]["name"] == "lookup"
        assert memory.search("kestrel")[0].message["content"][0]["text"] == "an old kestrel"
    again: list[str] = []
    assert migrate.upgrade(db, progress=again.append) == migrate.HEAD
    assert again == []
    assert _search_words(db_url, "old") == [0, 1]  # each once: nothing indexed twice
    assert migrate.check(db) == []
    with db.engine.begin() as conn:
        assert search.check_index(conn) == []
    db.dispose()


def test_search_index_backfill_goes_in_batches(tmp_path):
    path = str(tmp_path / "old.db")
    db = _fill_at_0002(path, messages=20_005)
    lines: list[str] = []
    migrate.upgrade(db, progress=lines.append)
    db.dispose()
    assert lines == [
        "search index: indexing 20,005 messages",
        "search index: 20,000 of 20,005 messages",
        "search index: 20,005 of 20,005 messages",
    ]
    assert _search_words(path, "heron 20004") == [0, 20_004]


def test_search_index_downgrades_and_upgrades_again(db_url):
    from alembic import command

    from conversation_memory.store import search

    db = _fill_at_0002(db_url)
    migrate.upgrade(db)
    with db.engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0002")
    with db.engine.connect() as conn:
        inspector = sa.inspect(conn)
        assert not [t for t in inspector.get_table_names() if t.startswith("messages_fts")]
        assert "search_vector" not in {c["name"] for c in inspector.get_columns("messages")}
        assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one() == 3
    migrate.upgrade(db)
    assert _search_words(db_url, "kestrel") == [1]
    with db.engine.begin() as conn:
        assert search.check_index(conn) == []
    db.dispose()


def test_db_upgrade_shows_the_backfill(tmp_path):
    from click.testing import CliRunner

    from conversation_memory.cli import cli

    path = str(tmp_path / "old.db")
    _fill_at_0002(path).dispose()
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", path, "--json"])
    assert result.exit_code == 0, result.output
    assert "search index: 3 of 3 messages" in result.stderr
    assert f'"to": "{migrate.HEAD}"' in result.stdout
