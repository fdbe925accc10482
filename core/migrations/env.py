"""Alembic environment: uses the connection core.db hands over, or the URL in the config."""

from alembic import context
from sqlalchemy import create_engine

from core.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        assert url is not None  # core.db.upgrade sets it (and hands a connection)
        engine = create_engine(url)
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
