"""Idempotent inserts (at-least-once delivery means the same row may arrive twice), and updates
of many rows sent together."""

from collections import defaultdict

from sqlalchemy import bindparam
from sqlalchemy.dialects import postgresql, sqlite


def dialect_insert(session, table):
    """An INSERT that can take ON CONFLICT clauses, for the session's database."""
    make_insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return make_insert(table)


def insert_ignoring_duplicates(session, table, values: dict) -> bool:
    """Insert unless the primary/unique key exists; True when a row was inserted."""
    result = session.execute(dialect_insert(session, table).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


def insert_many_ignoring_duplicates(session, table, rows: list[dict], key) -> list:
    """Insert the rows whose key is not there yet, in one statement; returns the ``key`` column's
    values of the rows inserted (a concurrent writer's rows are not reported twice). ``key`` may
    be a tuple of columns: the values are then tuples."""
    if not rows:
        return []
    columns = key if isinstance(key, tuple) else (key,)
    # The rows go as parameters of one cached statement (SQLAlchemy still sends a single multi-row
    # INSERT): a statement built with .values(rows) would be compiled anew on every call.
    statement = dialect_insert(session, table).on_conflict_do_nothing().returning(*columns)
    result = session.execute(statement, rows)
    return [tuple(row) for row in result] if isinstance(key, tuple) else list(result.scalars())


def update_many(session, table, key, rows: list[dict]) -> None:
    """Update each row whose ``key`` column has the value ``row[key.name]`` with the row's other
    values: one statement sent with every row's parameters for each distinct set of columns
    (PostgreSQL gets them a page at a time, db.create_db_engine)."""
    by_columns = defaultdict(list)
    for row in rows:
        by_columns[tuple(sorted(row))].append(row)
    for group in by_columns.values():
        session.execute(
            table.update().where(key == bindparam("b_key")),
            [{"b_key": row[key.name], **{k: v for k, v in row.items() if k != key.name}} for row in group],
        )
