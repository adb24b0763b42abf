"""Idempotent inserts (at-least-once delivery means the same row may arrive twice), and updates
of many rows sent together."""

import re
from collections import defaultdict

import psycopg2.extensions
from sqlalchemy import bindparam
from sqlalchemy.dialects import postgresql, sqlite

from services.common.db import on_postgresql


def dialect_insert(session, table):
    """An INSERT that can take ON CONFLICT clauses, for the session's database."""
    make_insert = postgresql.insert if on_postgresql(session) else sqlite.insert
    return make_insert(table)


def insert_ignoring_duplicates(session, table, values: dict) -> bool:
    """Insert unless the primary/unique key exists; True when a row was inserted."""
    result = session.execute(dialect_insert(session, table).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


def insert_many_ignoring_duplicates(session, table, rows: list[dict], key) -> list:
    """Insert the rows whose key is not there yet; returns the ``key`` column's values of the rows
    inserted (a concurrent writer's rows are not reported twice). ``key`` may be a tuple of
    columns: the values are then tuples. Every row names the same columns."""
    if not rows:
        return []
    columns = key if isinstance(key, tuple) else (key,)
    if on_postgresql(session):
        # One INSERT of literal rows (psycopg2 quotes them) per page: SQLAlchemy's own multi-row
        # INSERT spent twice the client's CPU per row on its parameters (0.21 against 0.12 ms for
        # a row of supervision_cases, 0.055 against 0.038 for a timeline row; bench/README.md).
        found = []
        for start in range(0, len(rows), INSERT_PAGE):
            connection, values, names = _literal_rows(session, table, rows[start : start + INSERT_PAGE])
            quote, target = connection.dialect.identifier_preparer.quote, _target(connection, table)
            found += connection.exec_driver_sql(
                f"INSERT INTO {target} ({', '.join(quote(n) for n in names)}) VALUES {values} "
                f"ON CONFLICT DO NOTHING RETURNING {', '.join(quote(c.name) for c in columns)}",
                execution_options={"no_parameters": True},  # a % in a value is not a placeholder
            ).all()
    else:
        # The rows go as parameters of one cached statement (SQLAlchemy still sends a single
        # multi-row INSERT): a statement built with .values(rows) would be compiled anew each time.
        statement = dialect_insert(session, table).on_conflict_do_nothing().returning(*columns)
        found = session.execute(statement, rows).all()
    return [tuple(row) for row in found] if isinstance(key, tuple) else [row[0] for row in found]


INSERT_PAGE = 1000  # rows in one INSERT: a sweep's decisions come by the thousand


def update_many(session, table, key, rows: list[dict]) -> None:
    """Update each row whose ``key`` column has the value ``row[key.name]`` with the row's other
    values, for each distinct set of columns in one statement (a key given twice with the same
    columns keeps its last row). On PostgreSQL that statement is ``UPDATE … FROM (VALUES …)``,
    planned once for all the rows: an UPDATE per row (SQLAlchemy's executemany, sent a page at a
    time) cost PostgreSQL twice the time per row (0.09 against 0.04 ms, 100-row batches) and the
    client a third more (bench/sending.py)."""
    by_columns = defaultdict(dict)
    for row in rows:
        by_columns[tuple(sorted(row))][row[key.name]] = row
    postgres = on_postgresql(session)
    for columns, group in by_columns.items():
        if postgres:
            assignments = {name: f'changes."{name}"' for name in columns if name != key.name}
            update_from_values(session, table, key, list(group.values()), assignments)
        else:
            session.execute(
                table.update().where(key == bindparam("b_key")),
                [{"b_key": row[key.name], **{k: v for k, v in row.items() if k != key.name}} for row in group.values()],
            )


def update_from_values(
    session, table, key, rows: list[dict], assignments: dict[str, str], condition: str = "", types: dict | None = None
) -> None:
    """One ``UPDATE table SET … FROM (VALUES …) AS changes(…) WHERE table.key = changes.key``
    for all the rows (PostgreSQL only): each row's values are a row of ``changes``, in the order of
    the first row's keys, each cast to the type of the table's column of that name (or to
    ``types[name]``, for a value that is no column). ``assignments`` maps a column to the SQL it
    takes, reading ``changes.NAME`` and the row as it was (``TABLE.NAME``); ``condition`` is SQL
    ANDed to the key's match. A key must come once: PostgreSQL updates a row once, with any one
    of its matches."""
    connection, values, names = _literal_rows(session, table, rows, types)
    quote, target = connection.dialect.identifier_preparer.quote, _target(connection, table)
    connection.exec_driver_sql(
        f"UPDATE {target} SET {', '.join(f'{quote(n)} = {sql}' for n, sql in assignments.items())} "
        f"FROM (VALUES {values}) AS changes({', '.join(quote(n) for n in names)}) "
        f"WHERE {target}.{quote(key.name)} = changes.{quote(key.name)}" + (f" AND ({condition})" if condition else ""),
        execution_options={"no_parameters": True},  # a % in a value is not a placeholder
    )


def _target(connection, table) -> str:
    return connection.dialect.identifier_preparer.format_table(table)


def _literal_rows(session, table, rows: list[dict], types: dict | None = None) -> tuple:
    """``(connection, "(…), (…)", names)``: the rows as a VALUES list, their values in the order of
    the first row's keys (``names``), each cast to the type of the table's column of that name,
    or to ``types[name]``. The values are quoted by psycopg2 (mogrify), after the column type's
    own conversion, and the statement goes through SQLAlchemy, so that its errors come as
    SQLAlchemy's and a broken connection is noticed as with any other."""
    connection = session.connection()
    dialect = connection.dialect
    names = list(rows[0])
    types = {name: (types or {}).get(name) or table.c[name].type for name in names}
    processors = [types[name].bind_processor(dialect) for name in names]
    row_template = "(" + ", ".join(f"%s::{_cast_to(types[name], dialect)}" for name in names) + ")"
    driver = connection.connection.driver_connection
    with driver.cursor() as cursor:
        values = b",".join(
            cursor.mogrify(
                row_template, [process(row[n]) if process else row[n] for n, process in zip(names, processors)]
            )
            for row in rows
        ).decode(psycopg2.extensions.encodings[driver.encoding])
    return connection, values, names


def _cast_to(type_, dialect) -> str:
    """What a VALUES column is cast to, so that it reaches the column as its own type (VALUES
    alone would read a JSON or a timestamp as text); text where the type has a length, since a
    cast to VARCHAR(n) cuts a longer value short where assigning it to the column refuses it."""
    return re.sub(r"\b(VARCHAR|CHAR)\(\d+\)", "text", type_.compile(dialect=dialect))
