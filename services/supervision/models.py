"""Supervision's own tables: its projection of cases, built only from bus events."""

from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, Text

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

case_projection = Table(
    "supervision_cases",
    metadata,
    Column("case_id", String(32), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("title", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    Column("kind", String(32)),
    Column("category", String(64)),
    Column("street", String(64)),
    Column("residents_affected", Integer),
    Column("received_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("lead_department", String(64)),
    Column("departments", JSON),  # every department the case was referred to
    Column("first_referred_at", UTCDateTime),
    Column("returns", Integer, nullable=False, server_default="0"),
    Column("extensions", Integer, nullable=False, server_default="0"),
    Column("reopen_count", Integer, nullable=False, server_default="0"),
    Column("unsatisfied_count", Integer, nullable=False, server_default="0"),
    Column("last_rating", String(8)),
)

referral_projection = Table(
    "supervision_referrals",
    metadata,
    Column("referral_id", String(48), primary_key=True),
    Column("case_id", String(32), nullable=False),
    Column("department", String(64), nullable=False),
    Column("department_name", String(200)),
    Column("is_lead", Integer, nullable=False),
    Column("round", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("extension", String(16)),
    Column("referred_at", UTCDateTime, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_supervision_referrals_case", "case_id"),
)

# The whole-process record: one row per event about a case, each event recorded once.
timeline = Table(
    "supervision_timeline",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("case_id", String(32), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("details", JSON),
    Column("summary", Text),
    Index("ix_supervision_timeline_case", "case_id", "at"),
)

outbox = outbox_table(metadata, "supervision")
