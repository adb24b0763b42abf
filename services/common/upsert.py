"""Idempotent inserts: at-least-once delivery means the same row may arrive twice."""

from sqlalchemy.dialects import postgresql, sqlite


def insert_ignoring_duplicates(session, table, values: dict) -> bool:
    """Insert unless the primary/unique key exists; True when a row was inserted."""
    dialect = session.get_bind().dialect.name
    make_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = session.execute(make_insert(table).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


def insert_many_ignoring_duplicates(session, table, rows: list[dict], key) -> list:
    """Insert the rows whose key is not there yet, in one statement; returns the ``key`` column's
    values of the rows inserted (a concurrent writer's rows are not reported twice)."""
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    make_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = make_insert(table).values(rows).on_conflict_do_nothing().returning(key)
    return list(session.scalars(statement))
