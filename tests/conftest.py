"""Shared fixtures: real SQLite files, and a real PostgreSQL when configured.

PostgreSQL tests run whenever CONVMEM_TEST_POSTGRES_URL is set (``.ci/run``
sets it and fails if the server is unreachable). Each test gets its own
schema, dropped afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("CONVMEM_TEST_POSTGRES_URL")


def _pg_schema_url(schema: str) -> str:
    assert PG_URL is not None
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"


LONGEST_FIRST = ("tests/test_local.py", "tests/test_quickstart.py")
"""Modules of the longest tests (the local model's chats, a fresh venv)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first: under ``-n auto`` the first worker then starts them at
    once instead of after its share of quick tests, and the run ends sooner. (xdist
    hands each worker a run of consecutive tests, so only these few move: moving
    every slow test would give them all to one worker.)"""
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema."""
    if not PG_URL:
        pytest.skip("CONVMEM_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin_url = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(admin_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _pg_schema_url(schema)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The same test on a real SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "chats.db")
    return request.getfixturevalue("pg_url")
