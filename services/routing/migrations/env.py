"""Alembic environment for the routing service's own tables (version table alembic_version_routing)."""

from services.common.migrations import run_migrations_online
from services.routing.models import metadata

run_migrations_online(metadata)
