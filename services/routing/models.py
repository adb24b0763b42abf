"""Routing's own tables."""

from sqlalchemy import Column, MetaData, String, Table

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

# Every case routing has heard of, recorded once per case however often the event arrives.
routing_cases = Table(
    "routing_cases",
    metadata,
    Column("case_id", String(32), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("category", String(64)),
    Column("street", String(64)),
    Column("kind", String(32)),
    Column("status", String(32), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

outbox = outbox_table(metadata, "routing")
