"""Alembic environment, driven by conversation_memory.store.migrate.

The library builds Alembic's Config in code and hands over an open
connection; there is no alembic.ini to find.
"""

from alembic import context

from conversation_memory.store.schema import VERSION_TABLE, metadata

config = context.config
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite can't ALTER most things in place; batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)

with context.begin_transaction():
    context.run_migrations()
