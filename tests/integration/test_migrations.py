"""Each service's migrations create exactly the tables its models describe (and only its own)."""

import pytest
from alembic import command

from services.common import config as settings
from services.common.migrations import alembic_config


@pytest.mark.parametrize("service", settings.SERVICES)
def test_migrations_match_the_models(database_url, service):
    command.check(alembic_config(service, database_url))  # raises when a migration is missing


def test_kept_clusters_are_given_to_the_cases_already_projected(tmp_path):
    """Migration 0005 clusters the cases projected before it, as evaluation used to on the fly,
    and fills each case's nearest open deadline."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'supervision.db'}"
    config = alembic_config("supervision", url)
    command.upgrade(config, "0004")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for case_id, title, category in [
            ("C-0", "海吉星市场交通拥堵", "traffic"),
            ("C-1", "海吉星市场交通拥堵严重", "traffic"),
            ("C-2", "丹竹头社区路灯不亮", "traffic"),
        ]:
            connection.execute(
                sa.text(
                    "INSERT INTO supervision_cases (case_id, source, title, status, category, street, received_at,"
                    " updated_at, returns, extensions, reopen_count, unsatisfied_count) VALUES (:case_id, 's',"
                    " :title, 'referred', :category, 'pinghu', '2026-10-01 00:00:00.000000',"
                    " '2026-10-01 00:00:00.000000', 0, 0, 0, 0)"
                ),
                dict(case_id=case_id, title=title, category=category),
            )
        connection.execute(
            sa.text(
                "INSERT INTO supervision_referrals (referral_id, case_id, department, is_lead, round, status,"
                " referred_at, due_at, updated_at) VALUES ('C-0-R1', 'C-0', 'cgj', 1, 1, 'referred',"
                " '2026-10-01 00:00:00.000000', '2026-10-12 00:00:00.000000', '2026-10-01 00:00:00.000000')"
            )
        )
    command.upgrade(config, "head")
    with engine.begin() as connection:
        rows = connection.execute(
            sa.text("SELECT case_id, cluster_key, nearest_due FROM supervision_cases ORDER BY case_id")
        ).all()
    assert [(r.case_id, r.cluster_key) for r in rows] == [
        ("C-0", "cluster:traffic:pinghu:C-0"),
        ("C-1", "cluster:traffic:pinghu:C-0"),
        ("C-2", "cluster:traffic:pinghu:C-2"),
    ]
    assert rows[0].nearest_due.startswith("2026-10-12") and rows[1].nearest_due is None
    engine.dispose()
