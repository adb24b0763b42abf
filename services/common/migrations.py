"""Alembic, once per service: each service has its own migration history and version table.

``run_migrations_online`` is what every service's ``migrations/env.py`` calls; ``upgrade`` is
what ``huiying migrate`` and ``huiying up`` call.
"""

from pathlib import Path

from alembic import command, context
from alembic.config import Config

from services.common import config as settings
from services.common.db import create_db_engine

SERVICES_DIR = Path(__file__).resolve().parents[1]


def alembic_config(service: str, database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_DIR / service / "migrations"))
    cfg.set_main_option("version_table", f"alembic_version_{service}")
    cfg.attributes["database_url"] = database_url or settings.database_url()
    return cfg


def upgrade(service: str, database_url: str | None = None) -> None:
    command.upgrade(alembic_config(service, database_url), "head")


def downgrade_to_base(service: str, database_url: str | None = None) -> None:
    command.downgrade(alembic_config(service, database_url), "base")


def run_migrations_online(target_metadata) -> None:
    cfg = context.config
    engine = create_db_engine(cfg.attributes["database_url"])
    own_tables = set(target_metadata.tables)

    def only_own_tables(name, type_, parent_names):
        # Services share one database: each one's autogenerate must see only its own tables,
        # or it would propose dropping the others'.
        return type_ != "table" or name in own_tables

    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=cfg.get_main_option("version_table"),
            render_as_batch=connection.dialect.name == "sqlite",
            include_name=only_own_tables,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
