"""Alembic environment: runs on the connection handed over by toolserver.manager.store."""

from alembic import context

from toolserver.manager.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:  # offline SQL generation: `alembic upgrade head --sql`
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)

with context.begin_transaction():
    context.run_migrations()
