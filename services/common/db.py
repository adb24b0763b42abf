"""Storage adapter: one SQLAlchemy engine per service process, handed to workers as a sessionmaker.

nameko-sqlalchemy does not support SQLAlchemy 2, so this is our own small DependencyProvider.
Workers write ``with self.db.begin() as session: ...``: one transaction, committed on success,
rolled back on any exception, so nothing is ever half-written.
"""

import threading
from collections import defaultdict
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

from nameko.extensions import DependencyProvider
from sqlalchemy import DateTime, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.types import TypeDecorator


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 here: SQLAlchemy 2.1 would pick psycopg 3, which eventlet
    cannot make cooperative."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme) :]
    return url


def create_db_engine(url: str, application_name: str | None = None) -> Engine:
    """``application_name`` (PostgreSQL): how pg_stat_activity and the server's log name this
    process's connections, e.g. ``huiying-supervision``."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # Four service processes share one embedded file: WAL lets readers and one writer
            # work at once, and busy_timeout makes a writer wait instead of failing.
            dbapi_connection.isolation_level = None  # transactions begin below, not in the driver
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection):
            # Take the write lock at the start: a transaction that read first and wrote later
            # would fail outright (SQLITE_BUSY) if another process wrote in between.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pool_pre_ping: it costs a round trip on every checkout, i.e. on every transaction (a
    # tenth of a service's time in a burst). After a PostgreSQL restart the first statement on a
    # stale connection fails instead; SQLAlchemy then discards the whole pool, and the failed
    # message is retried by the broker (events, tickets, deliveries), the timer tries again, or
    # the HTTP client gets a 5xx and resends: nothing accepted depends on the first try.
    # values_plus_batch: an UPDATE run with many parameter sets (a batch of cases) goes in pages
    # of 100 per round trip, not one round trip per row (INSERTs are multi-row either way).
    connect_args = {"application_name": application_name} if application_name else {}
    return create_engine(
        url, pool_size=10, max_overflow=10, executemany_mode="values_plus_batch", connect_args=connect_args
    )


class OneAtATime:
    """SQLite only: one transaction at a time in this process. sqlite3 waits for a lock inside C,
    without yielding to eventlet, so a greenthread waiting for a lock that another greenthread of
    the same process holds would wait for a holder that can never run. PostgreSQL needs none of
    this: psycogreen makes its waits cooperative."""

    def __init__(self, maker: sessionmaker):
        self.maker = maker
        self.lock = threading.RLock()  # green once eventlet has patched threading

    @contextmanager
    def __call__(self):
        with self.lock, self.maker() as session:
            yield session

    @contextmanager
    def begin(self):
        with self.lock, self.maker.begin() as session:
            yield session


ON_COMMIT = "huiying.on_commit"  # session.info: (key, item) pairs handed over when it commits
MAX_HANDED_OVER = 10_000  # per key; more are left to whoever reads them back from the tables


def hand_over_on_commit(maker: sessionmaker, sessions):
    """What a transaction put in ``session.info[ON_COMMIT]`` lands in ``sessions.committed[key]``
    when it commits, and is dropped when it rolls back (no service uses savepoints). The outbox
    publishes its events from there, without reading them back."""
    sessions.committed = defaultdict(list)

    @event.listens_for(maker, "after_commit")
    def _committed(session):
        for key, item in session.info.pop(ON_COMMIT, ()):
            held = sessions.committed[key]
            held.append(item)
            del held[:-MAX_HANDED_OVER]

    @event.listens_for(maker, "after_rollback")
    def _rolled_back(session):
        session.info.pop(ON_COMMIT, None)


class Database(DependencyProvider):
    """Gives each worker a session factory: ``with db() as s`` to read, ``with db.begin() as s``
    for a transaction."""

    def setup(self):
        self.engine = create_db_engine(self.container.config["DATABASE_URL"], f"huiying-{self.container.service_name}")
        maker = sessionmaker(self.engine, expire_on_commit=False)
        self.sessions = OneAtATime(maker) if self.engine.dialect.name == "sqlite" else maker
        hand_over_on_commit(maker, self.sessions)

    def stop(self):
        self.engine.dispose()

    def kill(self):
        self.engine.dispose()

    def get_dependency(self, worker_ctx):
        return self.sessions


def on_postgresql(session) -> bool:
    """Whether the session's database is PostgreSQL (else SQLite, for development)."""
    return session.get_bind().dialect.name == "postgresql"


@contextmanager
def snapshot(sessions):
    """A read-only session that sees one consistent snapshot across several SELECTs (PostgreSQL's
    READ COMMITTED would let a record and its parts be read from before and after a commit)."""
    with sessions() as session:
        if on_postgresql(session):
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


class UTCDateTime(TypeDecorator):
    """Instants stored in UTC and read back zone-aware, on PostgreSQL and SQLite alike
    (SQLite keeps no zone, so a +08:00 value would otherwise come back eight hours off)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: every instant must carry its time zone")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value
