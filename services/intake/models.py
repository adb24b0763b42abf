"""Intake's own tables. No other service reads or writes them."""

from sqlalchemy import (
    JSON,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

cases = Table(
    "intake_cases",
    metadata,
    Column("id", String(32), primary_key=True),  # LG-2026-000123: readable, sortable
    Column("source", String(64), nullable=False),
    Column("external_id", String(128), nullable=False),
    Column("channel", String(16), nullable=False),  # http, open311, amqp, import, cli
    Column("title", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("category", String(64)),
    Column("street", String(64)),
    Column("sector", String(64)),
    Column("workstation", String(64)),
    Column("kind", String(32)),
    Column("address", String(300)),
    Column("lat", Float),
    Column("lon", Float),
    Column("residents_affected", Integer),
    Column("reporter_name", String(64)),
    Column("reporter_phone", String(32)),  # stored for call-backs; masked in every output
    Column("status", String(32), nullable=False),
    Column("status_notes", Text),
    Column("agency_responsible", String(200)),  # the lead department's name, once referred
    Column("expected_at", UTCDateTime),  # the lead referral's deadline
    Column("received_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("source", "external_id", name="uq_intake_cases_source_external_id"),
    Index("ix_intake_cases_received_at", "received_at"),
)

# One row per year: the next case number is taken under a row lock, so ids never repeat.
case_counters = Table(
    "intake_case_counters",
    metadata,
    Column("year", Integer, primary_key=True),
    Column("last_number", Integer, nullable=False),
)

directory_versions = Table(
    "intake_directory_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("content_hash", String(16), nullable=False),
    Column("document", JSON, nullable=False),
    Column("loaded_at", UTCDateTime, nullable=False),
)

credentials = Table(
    "intake_credentials",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key; the key is never stored
    Column("key_prefix", String(12), nullable=False),  # lets staff tell keys apart in listings
    Column("role", String(16), nullable=False),  # source, department, staff
    Column("subject", String(128), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
)

outbox = outbox_table(metadata, "intake")
