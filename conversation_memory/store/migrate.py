"""Schema migrations, driven by the library (no alembic.ini).

The Alembic scripts ship inside the wheel as ``conversation_memory/migrations``
(a source checkout keeps them in the top-level ``migrations/`` folder). When a
database is opened, :func:`ensure_schema` compares its revision with the
scripts' head:

* no tables of ours: a new database, created at head;
* at head: nothing to do;
* older: :class:`SchemaOutdated`, saying what to run, unless ``upgrade=True``;
* a revision these scripts don't know: :class:`SchemaTooNew`, untouched.

``upgrade``, ``current`` and ``check`` are the calls behind ``convmem db``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

from conversation_memory.errors import NotADatabase, SchemaOutdated, SchemaTooNew, StoreError
from conversation_memory.store.database import Database, Found, missing_database
from conversation_memory.store.schema import VERSION_TABLE, metadata

if TYPE_CHECKING:
    from alembic.config import Config

OUR_TABLES = frozenset(metadata.tables)

Progress = Callable[[str], None]
"""Receives progress lines from a running migration."""

HEAD = "0005"
"""The newest migration's revision. Opening a database compares against this
constant rather than loading the scripts, so the common case (a database
already at head) never imports Alembic, a tenth of a second of start-up for
every ``convmem`` command. A test checks it against the scripts' head."""


def script_location() -> Path:
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(
        "the migration scripts are missing from this installation; reinstall "
        "conversation-memory (pip install --force-reinstall conversation-memory)"
    )


def alembic_config(
    connection: Connection | None = None, *, progress: Progress | None = None
) -> Config:
    # Alembic's own messages ("No new upgrade operations detected") go nowhere: the
    # callers report results themselves, and stdout may be a --json document.
    from alembic.config import Config

    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(script_location()))
    if connection is not None:
        config.attributes["connection"] = connection
    # A migration with long work (0003's backfill of the search index) reports
    # through this, one line at a time.
    config.attributes["progress"] = progress
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _revision(conn: Connection) -> str | None:
    # What Alembic's MigrationContext.get_current_revision() reads, without loading it.
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise StoreError(
            f"the {VERSION_TABLE} table holds several revisions ({', '.join(rows)}); "
            "this database was not written by conversation_memory alone"
        )
    return rows[0] if rows else None


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    try:
        return scripts.get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for unknown ids
        return False


def snapshot(db: Database) -> Found:
    """Our tables and revision, read through the engine (servers, in-memory SQLite)."""
    with db.engine.connect() as conn:
        tables = frozenset(inspect(conn).get_table_names())
        revision = _revision(conn) if VERSION_TABLE in tables else None
        conn.rollback()
    return Found(tables, revision)


def refuse_foreign(db: Database, found: Found) -> None:
    """Raise NotADatabase for tables that are not ours to add to or upgrade."""
    if VERSION_TABLE in found.tables:
        return
    ours = found.tables & OUR_TABLES
    if ours:
        raise NotADatabase(
            f"{db.target.display()} has tables named like ours ({', '.join(sorted(ours))}) "
            "but no conversation_memory version record; it was left untouched. "
            "Use another database or schema.",
        )
    if db.target.is_sqlite and found.tables:
        raise NotADatabase(
            f"{db.target.display()} is a SQLite database of another application "
            f"(tables: {', '.join(sorted(found.tables)[:5])}); it was left untouched. "
            "Choose another path.",
        )


def preflight(db: Database, found: Found, *, upgrade: bool = False) -> str | None:
    """Decide from a snapshot, before any write: refuse, or say which upgrade is due.

    Returns None when the database is at head, "head" when it must be
    created or upgraded (and that is allowed), and raises otherwise.
    """
    head = HEAD
    if VERSION_TABLE not in found.tables:
        refuse_foreign(db, found)
        return "head"
    current = found.revision
    if current == head:
        return None
    if current is None or _known(current):
        if upgrade:
            return "head"
        raise SchemaOutdated(
            f"{db.target.display()} is at schema revision {current}, this version needs "
            f"{head}. Back it up, then run `convmem db upgrade --db ...` or call "
            "conversation_memory.store.migrate.upgrade(db), or open it with "
            "Memory(..., upgrade=True).",
            revision=current,
            head=head,
        )
    raise SchemaTooNew(
        f"{db.target.display()} is at schema revision {current}, which this version of "
        "conversation-memory does not know (it was written by a newer version). It was left "
        "untouched; upgrade conversation-memory to open it.",
        revision=current,
        head=head,
    )


def ensure_schema(
    db: Database, *, upgrade: bool = False, found: Found | None = None, create: bool = True
) -> str:
    """Bring a freshly opened database to head, or refuse it; return its revision.

    ``create=False`` refuses a database without our schema instead of creating it.
    """
    found = found or snapshot(db)
    if preflight(db, found, upgrade=upgrade) is not None:
        if not create and VERSION_TABLE not in found.tables:
            raise missing_database(db.target)
        _upgrade(db, "head")
    return HEAD


def _upgrade(db: Database, revision: str, progress: Progress | None = None) -> None:
    from alembic import command

    with db.engine.begin() as conn:
        command.upgrade(alembic_config(conn, progress=progress), revision)


def current(db: Database) -> str | None:
    """The database's schema revision (None for a database without our schema)."""
    with db.engine.connect() as conn:
        if VERSION_TABLE not in inspect(conn).get_table_names():
            return None
        return _revision(conn)


def state(revision: str | None) -> str:
    """Where a database at ``revision`` stands: "up to date", "outdated" (an upgrade is
    due), "too new" (written by a newer version: left alone) or "empty" (no schema yet)."""
    if revision is None:
        return "empty"
    if revision == HEAD:
        return "up to date"
    return "outdated" if _known(revision) else "too new"


def upgrade(db: Database, revision: str = "head", *, progress: Progress | None = None) -> str:
    """Upgrade to ``revision`` (default head); a no-op when already there.

    ``progress`` receives a line of text now and then during long steps
    (indexing existing messages for search), for a command to show.
    """
    with db.engine.connect() as conn:
        existing = current(db)
        conn.rollback()
    if existing is not None and existing != head_revision() and not _known(existing):
        raise SchemaTooNew(
            f"{db.target.display()} is at revision {existing}, which this version does not "
            "know (it was written by a newer version); it was left untouched. Upgrade "
            "conversation-memory instead.",
            revision=existing,
        )
    _upgrade(db, revision, progress)
    result = current(db)
    assert result is not None
    return result


def check(db: Database) -> list[str]:
    """Differences between the models and the database schema (empty when they agree).

    Only a database at head can be compared: an outdated or too-new one raises
    what opening it would, and one without our schema says how to create it.
    """
    from alembic import command
    from alembic.util.exc import AutogenerateDiffsDetected

    if preflight(db, snapshot(db)) is not None:
        raise SchemaOutdated(
            f"{db.target.display()} has no conversation_memory schema yet; "
            "`convmem db upgrade --db ...` creates it",
            revision=None,
            head=HEAD,
        )

    with db.engine.connect() as conn:
        try:
            command.check(alembic_config(conn))
        except AutogenerateDiffsDetected as exc:
            return [line for line in str(exc).splitlines() if line.strip()]
        finally:
            conn.rollback()
    return []
