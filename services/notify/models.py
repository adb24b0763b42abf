"""Notify's own tables."""

from sqlalchemy import MetaData

from services.common.outbox import outbox_table

metadata = MetaData()

outbox = outbox_table(metadata, "notify")
