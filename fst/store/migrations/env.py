"""Alembic environment: run by `RunDB.upgrade()` (which passes its own connection) or by the
alembic CLI for developers, e.g. `alembic -x url=sqlite:///x.db revision -m "..."` with
script_location pointing at this folder."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from fst.store.db import Base, database_url, make_engine

config = context.config
target_metadata = Base.metadata


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def url() -> str:
    return database_url(
        context.get_x_argument(as_dictionary=True).get("url")
        or (config.get_main_option("sqlalchemy.url"))
    )


if context.is_offline_mode():
    context.configure(url=url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    run_with(conn)
else:
    engine = make_engine(url())
    with engine.begin() as c:
        run_with(c)
    engine.dispose()
