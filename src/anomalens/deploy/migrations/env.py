"""Alembic environment: migrations run on the connection `anomalens.deploy.store.migrate` hands
over (`config.attributes["connection"]`)."""

from alembic import context

from anomalens.deploy.store import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
