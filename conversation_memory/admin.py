"""Looking after a database: where it is, its schema revision, its upgrade and its check.

What ``convmem db`` does, as functions a script or an operator can call too.
``db`` is what :class:`~conversation_memory.Memory` takes: a file path, a
SQLAlchemy URL, or None for ``CONVMEM_DB`` (else the default file).
:func:`locate` opens nothing; the others open the database as it is (never
creating it, and migrating it only in :func:`upgrade`), refuse a file that
is not ours untouched, and close it again. Errors are the package's own:
``StoreError`` (no such database, unreachable), ``NotADatabase``,
``SchemaOutdated`` and ``SchemaTooNew``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from conversation_memory import _config
from conversation_memory.store import migrate
from conversation_memory.store.database import parse_target
from conversation_memory.store.opening import open_store

__all__ = ["Checked", "Location", "Revision", "Upgraded", "check", "locate", "revision", "upgrade"]

Db = str | os.PathLike[str] | None


@dataclass(frozen=True, slots=True)
class Location:
    """Where a database is, without opening it."""

    db: str
    """The file's path, or the URL with any password hidden."""
    source: str
    """Where it came from: "given" (``db``), "CONVMEM_DB" or "default"."""
    exists: bool | None
    """Whether the file exists (None for a server URL: not looked at)."""


@dataclass(frozen=True, slots=True)
class Revision:
    """A database's schema revision against the one this version needs."""

    db: str
    current: str | None
    """None: no schema of ours yet."""
    head: str
    state: str
    """"up to date", "outdated" (an upgrade is due), "too new" (written by a newer
    version: left alone) or "empty" (no schema yet)."""

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


@dataclass(frozen=True, slots=True)
class Upgraded:
    """What :func:`upgrade` did: the revision before (None: empty) and after."""

    db: str
    before: str | None
    after: str


@dataclass(frozen=True, slots=True)
class Checked:
    """The differences between a database's tables and the library's models (none: empty)."""

    db: str
    differences: list[str]


def locate(db: Db = None, *, env: Mapping[str, str] | None = None) -> Location:
    """Where ``db`` (else ``CONVMEM_DB``, else the default file) is; nothing is opened."""
    if db is not None:
        source = "given"
    else:
        source = _config.db_source(env)
        db = _config.default_db_path(env)
    target = parse_target(db)
    if target.path is None:
        return Location(target.display(), source, None)
    return Location(str(target.path), source, target.path.exists())


def revision(db: Db = None, *, env: Mapping[str, str] | None = None) -> Revision:
    """The schema revision of an existing database, and where it stands."""
    with open_store(db, check_schema=False, env=env) as store, store.database.errors():
        current = migrate.current(store.database)
        where = store.database.target.display()
    return Revision(where, current, migrate.head_revision(), migrate.state(current))


def upgrade(
    db: Db = None,
    *,
    progress: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> Upgraded:
    """Upgrade an existing database to the schema this version needs (back it up first).

    A database already at that revision is left as it is; one written by a newer
    version raises ``SchemaTooNew``. ``progress`` receives a line of text now and
    then during long steps (indexing stored messages for search).
    """
    with open_store(db, check_schema=False, env=env) as store, store.database.errors():
        database = store.database
        before = migrate.current(database)
        after = migrate.upgrade(database, progress=progress)
        where = database.target.display()
    return Upgraded(where, before, after)


def check(db: Db = None, *, env: Mapping[str, str] | None = None) -> Checked:
    """Compare a database at the current revision with the library's models."""
    with open_store(db, check_schema=False, env=env) as store, store.database.errors():
        differences = migrate.check(store.database)
        where = store.database.target.display()
    return Checked(where, differences)
