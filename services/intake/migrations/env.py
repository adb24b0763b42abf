"""Alembic environment for the intake service's own tables (version table alembic_version_intake)."""

from services.common.migrations import run_migrations_online
from services.intake.models import metadata

run_migrations_online(metadata)
