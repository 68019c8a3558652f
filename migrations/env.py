"""Alembic environment, driven by conversation_memory.store.migrate.

The library builds Alembic's Config in code and hands over an open
connection; there is no alembic.ini to find.
"""

from alembic import context

from conversation_memory.store.schema import VERSION_TABLE, metadata, outside_models

config = context.config
connection = config.attributes["connection"]


def include_name(name, type_, parent_names):
    # The full-text index (migration 0003: FTS5's table and its shadow tables on
    # SQLite, a generated tsvector column and its GIN index on PostgreSQL) is
    # not in the models, because neither backend's form can be; without this,
    # `alembic check` would report it as something to drop.
    return not outside_models(name, type_)


context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite can't ALTER most things in place; batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_name=include_name,
)

with context.begin_transaction():
    context.run_migrations()
