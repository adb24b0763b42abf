"""``update_many`` (services/common/upsert.py) on PostgreSQL, where it sends one ``UPDATE … FROM
(VALUES …)`` per set of columns: every type the services' tables use arrives as the column's type,
text is quoted whatever it holds, a key given twice keeps its last row, an unknown key changes
nothing, and the rows not named are left alone — the same as one UPDATE per row, which the test
runs beside it on a second table."""

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy.exc
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import sessionmaker

from services.common.db import UTCDateTime
from services.common.upsert import insert_many_ignoring_duplicates, update_many

CST = timezone(timedelta(hours=8))


def cases_table(metadata, name):
    return Table(
        name,
        metadata,
        Column("case_id", String(32), primary_key=True),
        Column("status", String(16), nullable=False),
        Column("title", String(200)),
        Column("departments", JSON),
        Column("updated_at", UTCDateTime),
        Column("returns", Integer, nullable=False, default=0),
    )


@pytest.fixture
def tables(db):
    metadata = MetaData()
    ours, one_by_one = cases_table(metadata, "test_update_many"), cases_table(metadata, "test_update_one_by_one")
    metadata.drop_all(db)
    metadata.create_all(db)
    start = datetime(2026, 12, 1, 9, tzinfo=CST)
    with db.begin() as connection:
        for table in (ours, one_by_one):
            connection.execute(
                table.insert(),
                [
                    dict(case_id=f"HY-{n}", status="received", title=None, departments=[], updated_at=start, returns=0)
                    for n in range(1, 6)
                ],
            )
    yield db, ours, one_by_one
    metadata.drop_all(db)


CHANGES = [
    {
        "case_id": "HY-1",
        "status": "referred",
        "departments": ["住建局", "城管局"],
        "updated_at": datetime(2026, 12, 2, 10, tzinfo=CST),
    },
    {"case_id": "HY-2", "status": "triage", "departments": None, "updated_at": None},
    {
        "case_id": "HY-1",
        "status": "closed",
        "departments": [],
        "updated_at": datetime(2026, 12, 3, 8, tzinfo=timezone.utc),
    },
    {"case_id": "HY-3", "title": 'O\'Brien 说："路灯不亮" 100% %s %(x)s; DROP TABLE x; --', "returns": 2},
    {"case_id": "HY-404", "status": "lost", "departments": [1], "updated_at": datetime(2026, 12, 2, tzinfo=CST)},
]


def rows_of(db, table):
    with db.connect() as connection:
        return [row._asdict() for row in connection.execute(select(table).order_by(table.c.case_id))]


def test_one_statement_per_set_of_columns_does_what_an_update_per_row_does(tables):
    db, ours, one_by_one = tables
    with sessionmaker(db).begin() as session:
        update_many(session, ours, ours.c.case_id, CHANGES)
    with db.begin() as connection:
        for change in CHANGES:  # in order: a later row for the same key wins
            values = {k: v for k, v in change.items() if k != "case_id"}
            connection.execute(
                one_by_one.update().where(one_by_one.c.case_id == bindparam("b_key")),
                {"b_key": change["case_id"], **values},
            )
    got, expected = rows_of(db, ours), rows_of(db, one_by_one)
    assert got == expected
    assert [row["case_id"] for row in got] == ["HY-1", "HY-2", "HY-3", "HY-4", "HY-5"]  # nothing added
    assert got[0]["status"] == "closed" and got[0]["departments"] == []
    assert got[0]["updated_at"] == datetime(2026, 12, 3, 8, tzinfo=timezone.utc)
    assert got[1]["departments"] is None and got[1]["updated_at"] is None
    assert got[2]["title"].startswith("O'Brien") and got[2]["returns"] == 2 and got[2]["status"] == "received"
    assert got[3]["status"] == got[4]["status"] == "received"


def test_a_bad_value_fails_the_whole_statement_and_leaves_every_row_as_it_was(tables):
    db, ours, _ = tables
    before = rows_of(db, ours)
    with pytest.raises(Exception, match="naive datetime"), sessionmaker(db).begin() as session:
        update_many(session, ours, ours.c.case_id, [{"case_id": "HY-1", "updated_at": datetime(2026, 12, 3)}])
    with pytest.raises(sqlalchemy.exc.DataError, match="value too long"), sessionmaker(db).begin() as session:
        update_many(
            session,
            ours,
            ours.c.case_id,
            [{"case_id": "HY-1", "status": "ok"}, {"case_id": "HY-2", "status": "x" * 17}],
        )
    assert rows_of(db, ours) == before


def new_rows(first: int, count: int) -> list[dict]:
    return [
        dict(
            case_id=f"HY-{n}",
            status="received",
            title=f"第{n}件 O'Brien 100% %s %(x)s; --",
            departments=["住建局", {"n": n}] if n % 2 else None,
            updated_at=datetime(2026, 12, 1, 9, tzinfo=CST) + timedelta(minutes=n),
            returns=n,
        )
        for n in range(first, first + count)
    ]


def test_inserting_many_adds_only_the_new_rows_and_returns_their_keys_as_sqlalchemy_s_own_insert_does(tables):
    """``insert_many_ignoring_duplicates`` on PostgreSQL (literal rows, a page of 1,000 at a time)
    beside SQLAlchemy's own INSERT … ON CONFLICT DO NOTHING of the same rows on a second table:
    every type arrives as itself, text is quoted whatever it holds, the rows already there (HY-1
    to HY-5) are left alone and not returned."""
    db, ours, one_by_one = tables
    rows = new_rows(4, 1_500)  # HY-4 and HY-5 are there already
    with sessionmaker(db).begin() as session:
        returned = insert_many_ignoring_duplicates(session, ours, rows, ours.c.case_id)
        pairs = insert_many_ignoring_duplicates(session, ours, new_rows(1_000, 600), (ours.c.case_id, ours.c.returns))
    with db.begin() as connection:
        for batch in (rows, new_rows(1_000, 600)):
            connection.execute(postgresql.insert(one_by_one).on_conflict_do_nothing(), batch)
    assert sorted(returned) == sorted(f"HY-{n}" for n in range(6, 1_504))
    assert sorted(pairs) == sorted((f"HY-{n}", n) for n in range(1_504, 1_600))
    assert rows_of(db, ours) == rows_of(db, one_by_one)
    [row] = [row for row in rows_of(db, ours) if row["case_id"] == "HY-7"]
    assert row == {**new_rows(7, 1)[0], "updated_at": datetime(2026, 12, 1, 1, 7, tzinfo=timezone.utc)}


def test_a_bad_row_inserts_nothing(tables):
    db, ours, _ = tables
    before = rows_of(db, ours)
    rows = new_rows(10, 3)
    rows[2]["status"] = "x" * 17
    with pytest.raises(sqlalchemy.exc.DataError, match="value too long"), sessionmaker(db).begin() as session:
        insert_many_ignoring_duplicates(session, ours, rows, ours.c.case_id)
    assert rows_of(db, ours) == before
