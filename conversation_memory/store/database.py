"""Opening a database: URL handling, file checks, connection hygiene, transactions.

All database hygiene lives here:

* SQLite files get WAL, ``busy_timeout`` and ``foreign_keys=ON`` from one
  connect-event listener, and pysqlite's own transaction handling is switched
  off so that write transactions start with ``BEGIN IMMEDIATE``. A deferred
  read-then-write transaction fails at once with SQLITE_BUSY_SNAPSHOT when
  another writer got in between, ignoring ``busy_timeout``; taking the write
  lock up front makes writers queue instead.
* A path that exists must already be a SQLite file; it is inspected through a
  read-only (and, when no ``-wal`` file exists, immutable) connection first, so
  that a foreign, empty or corrupt file is refused without a byte changed and
  without a ``-wal`` or ``-shm`` file appearing beside it. A file with no
  tables is ours to fill only if no application has stamped it
  (``user_version``/``application_id``). New files are created with mode 0600.
* Every read is one snapshot. A context is built from several statements
  (the conversation row, then the summary, pinned messages and the tail);
  under PostgreSQL's default READ COMMITTED each statement sees the commits
  made before *it*, so a turn committed between the row and the tail was
  half-seen and two messages claimed one position. Read transactions there
  are ``REPEATABLE READ, READ ONLY`` (one snapshot, taken at the first
  statement; a read-only transaction never fails to serialize). SQLite's
  ``BEGIN`` (deferred) in WAL mode already keeps the snapshot of its first
  read until the transaction ends.
* Durability: ``synchronous=FULL`` (the default) syncs the WAL on every
  commit, so a stored turn survives a power cut; ``durability="normal"``
  (``synchronous=NORMAL``) syncs only at checkpoints, so a stored turn
  survives a crash of the process but the last ones may be lost to a power
  cut. PostgreSQL keeps its own settings.
* PostgreSQL URLs without a driver get psycopg (version 3).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from conversation_memory.errors import ConfigurationError, NotADatabase, StoreError

SQLITE_HEADER = b"SQLite format 3\x00"
PG_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
"""The first statement of a PostgreSQL read transaction (see the module docstring)."""
DEFAULT_BUSY_TIMEOUT_MS = 30_000
DURABILITY = {"full": "FULL", "normal": "NORMAL"}
"""``durability=`` settings and the SQLite ``synchronous`` mode each means."""


@dataclass(frozen=True)
class Target:
    """Where a database lives, after parsing what the caller gave."""

    url: str
    path: Path | None
    """The file, for SQLite files; None for in-memory SQLite and servers."""

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def display(self) -> str:
        """The URL with any password hidden, for error messages."""
        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return self.url


def parse_target(db: str | os.PathLike[str]) -> Target:
    """Accept a filesystem path, ``:memory:``, or a SQLAlchemy URL."""
    if isinstance(db, os.PathLike):
        db = os.fspath(db)
    if not isinstance(db, str) or not db.strip():
        raise ConfigurationError(
            f"db must be a file path or a database URL, got {db!r}; "
            "pass e.g. 'chats.db' or 'postgresql://user@host/dbname'"
        )
    if db == ":memory:":
        return Target("sqlite+pysqlite://", None)
    if db.startswith("postgres://"):  # libpq, Heroku and many hosts spell it this way
        db = "postgresql://" + db.removeprefix("postgres://")
    if "://" not in db:
        path = Path(db).expanduser().absolute()
        return Target(f"sqlite+pysqlite:///{path}", path)
    try:
        url = make_url(db)
    except ArgumentError as exc:
        raise ConfigurationError(f"db URL {db!r} cannot be parsed: {exc}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:"):
            return Target("sqlite+pysqlite://", None)
        path = Path(database).expanduser()
        if not path.is_absolute():
            # Three slashes are SQLAlchemy's relative form: sqlite:///tmp/x.db is
            # ./tmp/x.db, which is rarely what the writer of the URL meant.
            raise ConfigurationError(
                f"db URL {db!r} names {database!r}, a path relative to the current folder; "
                f"for /{database} write sqlite:////{database} (four slashes), or pass the "
                f"path itself ({database!r}) to mean the relative one"
            )
        return Target(f"sqlite+pysqlite:///{path}", path)
    if backend == "postgresql":
        if url.get_driver_name() in ("psycopg2", "psycopg"):
            url = url.set(drivername="postgresql+psycopg")
        return Target(url.render_as_string(hide_password=False), None)
    raise ConfigurationError(
        f"db URL scheme {url.drivername!r} is not supported; "
        "use a SQLite path or sqlite:///file.db, or postgresql://user@host/dbname"
    )


def missing_database(target: Target) -> StoreError:
    """What opening a database that does not exist says when it may not create one."""
    where = target.path if target.path is not None else target.display()
    return StoreError(
        f"there is no database at {where}; nothing was created. `convmem chat` or "
        "Memory(db) creates one, or point --db (CONVMEM_DB) at another",
        path=str(where),
    )


@dataclass(frozen=True)
class Found:
    """What a database holds before we touch it: table names and our schema revision."""

    tables: frozenset[str]
    revision: str | None


def inspect_sqlite_file(path: Path, version_table: str) -> Found | None:
    """Read an existing file's tables without changing a byte; None if it doesn't exist.

    This runs before any connection with our pragmas is made (switching to
    WAL rewrites the file header), so a file that turns out not to be ours
    is refused untouched.
    """
    if not path.exists():
        return None
    if path.is_dir():
        raise NotADatabase(
            f"{path} is a directory, not a database file; pass a file path such as "
            f"{path / 'convmem.db'}",
            path=str(path),
        )
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise NotADatabase(f"{path} cannot be read: {exc.strerror}", path=str(path)) from None
    if not header:
        raise NotADatabase(
            f"{path} is an empty (zero-length) file, not a conversation_memory database; "
            "it was left untouched. Delete it or choose another path.",
            path=str(path),
        )
    if header != SQLITE_HEADER:
        raise NotADatabase(
            f"{path} is not a SQLite database (wrong file header); it was left untouched. "
            "Choose another path.",
            path=str(path),
        )
    # A read-only open of a WAL-mode file still creates its -wal and -shm, so a
    # file we then refuse would get company. Without a -wal beside it, the file
    # holds every commit and is read as immutable (no locks, nothing created);
    # with one, it is in use (or its user crashed) and the side files exist.
    wal = Path(f"{path}-wal")
    immutable = not wal.exists()
    while True:
        try:
            tables, revision, marks = _read_sqlite_file(path, version_table, immutable=immutable)
            break
        except sqlite3.DatabaseError as exc:
            if immutable and wal.exists():
                # Another process opened it while we read without locks (its
                # checkpoint may have torn our read): read it again, properly.
                immutable = False
                continue
            raise NotADatabase(
                f"{path} is a damaged SQLite file ({exc}); it was left untouched. "
                "Restore it from a backup or choose another path.",
                path=str(path),
            ) from None
    if not tables and any(marks):
        # A schema-less file that an application stamped as its own.
        raise NotADatabase(
            f"{path} is a SQLite database of another application (no tables, but its "
            f"user_version is {marks[0]} and application_id {marks[1]}); it was left "
            "untouched. Choose another path.",
            path=str(path),
        )
    return Found(tables, revision)


def _read_sqlite_file(
    path: Path, version_table: str, *, immutable: bool
) -> tuple[frozenset[str], str | None, tuple[int, int]]:
    """Table names, our revision, and (user_version, application_id) of a file."""
    flags = "mode=ro&immutable=1" if immutable else "mode=ro"
    con = sqlite3.connect(f"{path.as_uri()}?{flags}", uri=True)
    try:
        tables = frozenset(
            name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        )
        revision = None
        if version_table in tables:
            found = con.execute(f"SELECT version_num FROM {version_table}").fetchone()
            revision = found[0] if found else None
        marks = (
            con.execute("PRAGMA user_version").fetchone()[0],
            con.execute("PRAGMA application_id").fetchone()[0],
        )
    finally:
        con.close()
    return tables, revision, marks


def create_sqlite_file(path: Path) -> None:
    """Create an empty database file readable by its owner only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(
            f"cannot create database file {path}: {exc.strerror}; "
            "check the folder exists and is writable, or pass another path",
            path=str(path),
        ) from None
    os.close(fd)


def _sqlite_pragmas(busy_timeout_ms: int, synchronous: str):
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are ours to begin (see module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            # FULL (SQLite's default) syncs the WAL on every commit: a stored
            # turn survives power loss, not only a crash of the process.
            # NORMAL syncs at checkpoints only (see the module docstring).
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    return on_connect


def _sqlite_begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.get_execution_options().get("convmem_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(
    target: Target,
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    durability: str = "full",
    echo: bool = False,
) -> Engine:
    if target.is_sqlite:
        if target.path is None:
            # One shared in-memory database for all connections of this engine.
            from sqlalchemy.pool import StaticPool

            engine = create_engine(
                target.url,
                echo=echo,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            engine = create_engine(target.url, echo=echo, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms, DURABILITY[durability]))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return create_engine(target.url, echo=echo, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the PostgreSQL driver is missing ({exc.name}); "
            "install it with: pip install 'conversation-memory[postgres]'"
        ) from None


@dataclass
class _Held:
    connection: Any
    pid: int
    in_use: bool = False


class _Transaction:
    """One transaction on a DBAPI cursor (see :meth:`Database.cursor`).

    A class rather than a generator-based context manager: it runs twice per
    turn, and each layer of ``contextlib`` costs microseconds an append feels.
    """

    __slots__ = ("_cursor", "_db", "_fairy", "_held", "_write")

    def __init__(self, db: Database, write: bool) -> None:
        self._db = db
        self._write = write
        self._held: _Held | None = None
        self._fairy: Any = None
        self._cursor: Any = None

    def __enter__(self) -> Any:
        db = self._db
        try:
            held = db._held() if db._hold else None
            if held is not None:
                held.in_use = True
                self._held = held
                cursor = held.connection.cursor()
                self._cursor = cursor
                cursor.execute("BEGIN IMMEDIATE" if self._write else "BEGIN")
                return cursor
            self._fairy = db.engine.raw_connection()
            cursor = self._cursor = self._fairy.cursor()
            if db.dialect == "sqlite":
                cursor.execute("BEGIN IMMEDIATE" if self._write else "BEGIN")
            elif not self._write:
                cursor.execute(PG_SNAPSHOT)
            return cursor
        except Exception as exc:
            self._release()
            raise db._translated(exc) from exc

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        db, cursor = self._db, self._cursor
        try:
            if exc is None:
                if self._held is not None or db.dialect == "sqlite":
                    cursor.execute("COMMIT")
                else:
                    self._fairy.commit()
            elif self._held is not None:
                cursor.execute("ROLLBACK")
            else:
                self._fairy.rollback()
        except Exception as error:
            if exc is None:
                raise db._translated(error) from error
        finally:
            self._release()
        if isinstance(exc, Exception):
            translated = db._translated(exc)
            if translated is not exc:
                raise translated from exc

    def _release(self) -> None:
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            cursor.close()
        if self._held is not None:
            self._held.in_use = False
            self._held = None
        if self._fairy is not None:
            fairy, self._fairy = self._fairy, None
            fairy.close()


class Database:
    """An engine plus the kinds of transaction the store uses."""

    def __init__(self, target: Target, engine: Engine) -> None:
        self.target = target
        self.engine = engine
        self.dialect = engine.dialect.name
        self._hold = self.dialect == "sqlite" and target.path is not None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all_held: list[_Held] = []

    @property
    def in_process(self) -> bool:
        """An in-memory SQLite database: it lives and dies with this process, and
        every thread shares its one connection."""
        return self.target.is_sqlite and self.target.path is None

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on both backends)."""
        with self._translate(), self.engine.connect() as conn, conn.begin():
            if self.dialect == "postgresql":
                conn.exec_driver_sql(PG_SNAPSHOT)
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: all or nothing, writers queue rather than fail."""
        with (
            self._translate(),
            self.engine.connect().execution_options(convmem_write=True) as conn,
            conn.begin(),
        ):
            yield conn

    def cursor(self, *, write: bool) -> _Transaction:
        """A DBAPI cursor inside a transaction, for the log's fixed SQL (``with
        database.cursor(write=...) as cur``).

        Same transaction rules as :meth:`read` / :meth:`write` (``BEGIN
        IMMEDIATE`` for SQLite writes), without SQLAlchemy's per-statement
        work: building a context or appending a message is a handful of fixed
        statements, and measured here the Core layer cost several times what
        SQLite itself did for them. On SQLite files each thread also keeps one
        connection of its own instead of checking one out of the pool per
        call (the checkout alone was ~60 us, a fifth of an append).
        """
        return _Transaction(self, write)

    def _held(self) -> _Held | None:
        """This thread's own connection (None while it is busy: nested use takes the pool)."""
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid():
            return None if held.in_use else held
        # A connection inherited across fork() must not be used by the child.
        fairy = self.engine.raw_connection()
        connection = fairy.driver_connection
        fairy.detach()  # ours now; the pool opens another for everyone else
        held = _Held(connection, os.getpid())
        with self._lock:
            self._all_held.append(held)
        self._local.held = held
        return held

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn driver errors about the database itself into our StoreError tree."""
        try:
            yield
        except Exception as exc:
            translated = self._translated(exc)
            if translated is exc:
                raise
            raise translated from exc

    def _translated(self, exc: Exception) -> Exception:
        """The StoreError a driver error about the database itself stands for.

        Errors that mean our SQL or data is wrong (integrity, programming) are
        bugs and stay as they are (``exc`` itself is returned).
        """
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if not self._is_driver_error(orig):
            return exc
        text = str(orig)
        if "database is locked" in text:
            return StoreError(
                f"the database {self.target.display()} stayed locked by another "
                "writer longer than busy_timeout; retry, or raise busy_timeout_ms",
            )
        if isinstance(orig, sqlite3.DatabaseError) and (
            "malformed" in text or "not a database" in text
        ):
            return NotADatabase(
                f"{self.target.display()} is damaged ({text})", path=str(self.target.path)
            )
        if type(orig).__name__ in ("OperationalError", "InterfaceError"):
            first = text.strip().splitlines()[0] if text.strip() else type(orig).__name__
            return StoreError(
                f"cannot use the database {self.target.display()}: {first}. Check that "
                "it is reachable and the URL, user and permissions are right.",
            )
        return exc

    def is_conflict(self, error: BaseException) -> bool:
        """Whether ``error`` is a constraint violation (a unique row another writer
        stored first), from the DBAPI cursor or from SQLAlchemy."""
        orig = error.orig if isinstance(error, DBAPIError) else error
        dbapi = getattr(self.engine.dialect, "loaded_dbapi", None)
        integrity = getattr(dbapi, "IntegrityError", sqlite3.IntegrityError)
        return isinstance(orig, sqlite3.IntegrityError | integrity)

    def _is_driver_error(self, error: BaseException | None) -> bool:
        dbapi = getattr(self.engine.dialect, "loaded_dbapi", None)
        base = getattr(dbapi, "Error", None)
        return isinstance(error, sqlite3.Error) or (
            isinstance(base, type) and isinstance(error, base)
        )

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Apply the same translation to code that uses the engine directly."""
        with self._translate():
            yield

    def dispose(self) -> None:
        with self._lock:
            held, self._all_held = self._all_held, []
        for each in held:
            if each.pid == os.getpid():
                with suppress(Exception):
                    each.connection.close()
        self._local = threading.local()
        with suppress(Exception):
            self.engine.dispose()


__all__ = [
    "DURABILITY",
    "Database",
    "Found",
    "Target",
    "create_sqlite_file",
    "inspect_sqlite_file",
    "make_engine",
    "missing_database",
    "parse_target",
]
