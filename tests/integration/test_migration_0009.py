"""Migration 0009 on a projection the old code wrote out of order, on PostgreSQL and SQLite: it
sets each row's times from the timeline and repairs what events projected out of order had left
wrong — a status set back by an older event, a step dropped because its referral was not there
yet, an extension's date set back — and leaves a sound case as it was. Downgrading works."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from services.common.db import create_db_engine
from services.common.migrations import alembic_config
from services.supervision.models import case_projection, referral_projection, timeline
from tests.support import TEST_DATABASE_URL

T0 = datetime(2026, 9, 1, 1, 0, tzinfo=timezone.utc)


def t(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture(params=["postgresql", "sqlite"])
def database_at_0008(request, tmp_path):
    """A database of its own with supervision's tables as migration 0008 left them."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'supervision.db'}"
        yield url
        return
    name = f"huiying_migration_{uuid.uuid4().hex[:8]}"
    server = create_db_engine(TEST_DATABASE_URL).execution_options(isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield TEST_DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with server.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        server.engine.dispose()


def old_projection(engine):
    """Four cases as the projection before 0009 could have left them."""
    # The models' tables, for their types (UTCDateTime on SQLite); each row names the same
    # columns, all of which 0008 has.
    case_defaults = dict(source="hotline-12345", title="t", received_at=T0, returns=0, extensions=0, on_agenda=False)
    case_defaults |= dict(reopen_count=0, unsatisfied_count=0, last_rating=None)
    rows, steps, referral_rows = [], [], []

    def case(case_id, status, **values):
        rows.append(case_defaults | dict(case_id=case_id, status=status, updated_at=t(60)) | values)

    def step(case_id, minutes, event_type, **details):
        steps.append(
            dict(event_id=str(uuid.uuid4()), case_id=case_id, event_type=event_type, at=t(minutes), details=details)
        )

    def referral(referral_id, status, round_number=1, due=t(10_000), **values):
        referral_rows.append(
            dict(referral_id=referral_id, case_id=referral_id.rsplit("-R", 1)[0], department="cgj", is_lead=1)
            | dict(round=round_number, status=status, referred_at=T0, due_at=due, updated_at=t(60))
            | dict(extension=None, replied_at=None, replied_on_time=None)
            | values
        )

    # A: the redo's case_referred came before the case_reopened, which set the status back; the
    # first reply came before its referral and was dropped.
    case("LG-2026-000001", "reopened", reopen_count=1, last_rating="不满意")
    step("LG-2026-000001", 1, "case_referred")
    step("LG-2026-000001", 2, "referral_replied", referral_id="LG-2026-000001-R1", on_time=True)
    step("LG-2026-000001", 3, "feedback_received", rating="不满意")
    step("LG-2026-000001", 4, "case_reopened")
    step("LG-2026-000001", 5, "case_referred")
    referral("LG-2026-000001-R1", "referred")
    referral("LG-2026-000001-R2", "referred", round_number=2)
    # B: a step whose referral's case_referred has not been projected yet.
    case("LG-2026-000002", "referred")
    step("LG-2026-000002", 1, "case_referred")
    step("LG-2026-000002", 2, "referral_returned", referral_id="LG-2026-000002-R2")
    referral("LG-2026-000002-R1", "referred")
    # C: the second extension's grant came first; the first then set the date back.
    case("LG-2026-000003", "referred")
    step("LG-2026-000003", 1, "case_referred")
    step("LG-2026-000003", 2, "extension_granted", referral_id="LG-2026-000003-R1", due_at=t(20_000).isoformat())
    step("LG-2026-000003", 3, "extension_granted", referral_id="LG-2026-000003-R1", due_at=t(30_000).isoformat())
    referral("LG-2026-000003-R1", "referred", due=t(20_000), extension="granted")
    # D: sound — replied, as the reply said.
    case("LG-2026-000004", "replied")
    step("LG-2026-000004", 1, "case_referred")
    step("LG-2026-000004", 2, "referral_replied", referral_id="LG-2026-000004-R1", on_time=True)
    referral("LG-2026-000004-R1", "replied", replied_at=t(2), replied_on_time=True)
    with engine.begin() as connection:
        connection.execute(sa.insert(case_projection), rows)
        connection.execute(sa.insert(referral_projection), referral_rows)
        connection.execute(sa.insert(timeline), steps)


def test_0009_sets_the_times_and_repairs_what_came_out_of_order(database_at_0008):
    config = alembic_config("supervision", database_at_0008)
    command.upgrade(config, "0008")
    engine = create_db_engine(database_at_0008)
    old_projection(engine)
    command.upgrade(config, "0009")
    with engine.connect() as connection:
        case = {r.case_id: r for r in connection.execute(sa.text("SELECT * FROM supervision_cases"))}
        referral = {r.referral_id: r for r in connection.execute(sa.text("SELECT * FROM supervision_referrals"))}

    def at(value):  # SQLite gives text back to a text query
        return datetime.fromisoformat(str(value)).replace(tzinfo=timezone.utc) if value is not None else None

    a = case["LG-2026-000001"]
    assert (a.status, at(a.status_at), at(a.lead_at), at(a.rated_at), a.early_steps) == (
        "referred",
        t(5),
        t(5),
        t(3),
        0,
    )
    assert at(a.nearest_due) == t(10_000)  # round 2's, still open (round 1's is replied now)
    r1 = referral["LG-2026-000001-R1"]
    assert (r1.status, at(r1.status_at), at(r1.replied_at), bool(r1.replied_on_time)) == ("replied", t(2), t(2), True)
    assert referral["LG-2026-000001-R2"].status == "referred" and referral["LG-2026-000001-R2"].status_at is None
    assert case["LG-2026-000002"].early_steps == 1
    c1 = referral["LG-2026-000003-R1"]
    assert (at(c1.due_at), c1.extension, at(c1.extension_at)) == (t(30_000), "granted", t(3))
    assert at(case["LG-2026-000003"].nearest_due) == t(30_000)
    d = case["LG-2026-000004"]
    assert (d.status, at(d.status_at), at(d.category_at)) == ("replied", t(2), t(1))

    command.downgrade(config, "0008")
    with engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("supervision_cases")}
    assert not columns & {"status_at", "rated_at", "lead_at", "category_at", "early_steps"}
    command.upgrade(config, "head")
    engine.dispose()
