"""Opening a store: the one way, for ``Memory``, ``AsyncMemory`` and ``convmem db``.

:func:`open_store` turns what the caller gave (a path, ``:memory:``, a URL,
or None for ``CONVMEM_DB`` / the default file) into an open :class:`Store`:

1. a SQLite file that exists is inspected untouched (``inspect_sqlite_file``):
   a foreign, empty or damaged file is refused before a connection could
   rewrite it; one that does not exist is created (mode 0600) unless
   ``create=False``;
2. the schema is checked before any write (``migrate.preflight``): a database
   of another application is refused, an outdated one raises
   ``SchemaOutdated`` unless ``upgrade=True``, a newer one ``SchemaTooNew``;
3. a new database gets the current schema, an outdated one is upgraded when
   asked (``migrate.ensure_schema``).

A file this call created is removed again if a later step fails; a caller's
file never is. ``check_schema=False`` opens an existing database as it is
(not created, not migrated, only refused if it is not ours): what the
``convmem db`` commands need to read or upgrade an outdated one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from conversation_memory import _config
from conversation_memory.errors import ConfigurationError
from conversation_memory.store import migrate
from conversation_memory.store.catalogue import Catalogue
from conversation_memory.store.database import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DURABILITY,
    Database,
    Found,
    create_sqlite_file,
    inspect_sqlite_file,
    make_engine,
    missing_database,
    parse_target,
)
from conversation_memory.store.log import ConversationLog
from conversation_memory.store.schema import VERSION_TABLE
from conversation_memory.store.statements import Statements
from conversation_memory.store.values import ConversationRow
from conversation_memory.store.vectors import VectorStore


class Store:
    """An open database: its catalogue, and a log for each conversation."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.catalogue = Catalogue(database)
        self._statements = Statements(database.dialect)
        self.vectors = VectorStore(database)
        """Message embeddings (optional semantic recall)."""

    def log(
        self, row: ConversationRow, *, model: str | None = None, unsaved: bool = False
    ) -> ConversationLog:
        """The log of the conversation ``row`` (``unsaved``: its row is written with
        its first turn)."""
        return ConversationLog(
            self.database, self._statements, row, model=model, unsaved=unsaved, vectors=self.vectors
        )

    def close(self) -> None:
        self.database.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_durability(durability: object) -> str:
    if durability not in DURABILITY:
        raise ConfigurationError(
            f"durability must be one of {tuple(DURABILITY)}, got {durability!r}",
            argument="durability",
        )
    return str(durability)


def open_store(
    db: str | os.PathLike[str] | None = None,
    *,
    create: bool = True,
    upgrade: bool = False,
    check_schema: bool = True,
    durability: str = "full",
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    env: Mapping[str, str] | None = None,
    echo: bool = False,
) -> Store:
    """Open (and create, and migrate) a database; see the module docstring."""
    check_durability(durability)
    target = parse_target(_config.default_db_path(env) if db is None else db)
    if not check_schema:
        create = False
    created = False
    found: Found | None = None
    if target.path is not None:
        if not check_schema and not target.path.exists():
            raise missing_database(target)
        found = inspect_sqlite_file(target.path, VERSION_TABLE)
        created = found is None
        if created and not create:
            raise missing_database(target)
    engine = make_engine(target, busy_timeout_ms=busy_timeout_ms, durability=durability, echo=echo)
    database = Database(target, engine)
    try:
        with database.errors():
            if not check_schema:
                if found is not None:
                    migrate.refuse_foreign(database, found)
            else:
                if found is not None:
                    # Refuse a file that isn't ours before a connection rewrites it.
                    migrate.preflight(database, found, upgrade=upgrade)
                elif target.path is not None:
                    create_sqlite_file(target.path)
                migrate.ensure_schema(database, upgrade=upgrade, found=found, create=create)
    except BaseException:
        database.dispose()
        if created and target.path is not None:
            # Only a file this call created is removed; never a caller's.
            for suffix in ("", "-wal", "-shm"):
                Path(f"{target.path}{suffix}").unlink(missing_ok=True)
        raise
    return Store(database)


__all__ = ["Store", "check_durability", "open_store"]
