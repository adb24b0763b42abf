"""Alembic environment for the notify service's own tables (version table alembic_version_notify)."""

from services.common.migrations import run_migrations_online
from services.notify.models import metadata

run_migrations_online(metadata)
