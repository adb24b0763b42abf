"""Alembic environment for the supervision service's own tables (version table alembic_version_supervision)."""

from services.common.migrations import run_migrations_online
from services.supervision.models import metadata

run_migrations_online(metadata)
