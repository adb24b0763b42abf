"""Each service's migrations create exactly the tables its models describe (and only its own)."""

import pytest
from alembic import command

from services.common import config as settings
from services.common.migrations import alembic_config


@pytest.mark.parametrize("service", settings.SERVICES)
def test_migrations_match_the_models(database_url, service):
    command.check(alembic_config(service, database_url))  # raises when a migration is missing
