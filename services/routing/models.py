"""Routing's own tables: its view of each case, and the referrals to departments."""

from sqlalchemy import JSON, Column, ForeignKey, Index, Integer, MetaData, String, Table, Text

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

# Every case routing has heard of, recorded once per case however often the event arrives.
routing_cases = Table(
    "routing_cases",
    metadata,
    Column("case_id", String(32), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("external_id", String(128)),  # the source system's own id (carried to notify)
    Column("channel", String(16)),
    Column("title", String(200)),
    Column("description", Text),
    Column("category", String(64)),
    Column("street", String(64)),
    Column("sector", String(64)),
    Column("workstation", String(64)),
    Column("kind", String(32)),
    Column("urgency", String(16)),
    Column("residents_affected", Integer),
    # awaiting_routing → referred ⇄ triage → replied → closed, or reopened → referred again
    Column("status", String(32), nullable=False),
    Column("triage_reason", Text),
    Column("lead_department", String(64)),
    Column("returned_by", JSON),  # departments that returned it: never chosen again
    Column("reopen_count", Integer, nullable=False, server_default="0"),
    Column("rating", String(8)),
    Column("decision", JSON),  # the last routing decision: rule ids and ruleset version
    Column("received_at", UTCDateTime, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime),
    Index("ix_routing_cases_status", "status"),
)

referrals = Table(
    "routing_referrals",
    metadata,
    Column("id", String(48), primary_key=True),  # LG-2026-000123-R2
    Column("case_id", String(32), ForeignKey("routing_cases.case_id"), nullable=False),
    Column("department", String(64), nullable=False),
    Column("is_lead", Integer, nullable=False),
    Column("round", Integer, nullable=False),  # 1, then +1 for each redo (重办)
    # referred → accepted → replied; referred/accepted → returned; superseded on redo
    Column("status", String(16), nullable=False),
    Column("referred_at", UTCDateTime, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("return_by", UTCDateTime, nullable=False),  # the return window closes
    Column("accepted_at", UTCDateTime),
    Column("returned_at", UTCDateTime),
    Column("return_reason", Text),
    Column("extension_status", String(16)),  # requested, granted, refused
    Column("extension_days", Integer),
    Column("extension_reason", Text),
    Column("extension_decided_at", UTCDateTime),
    Column("replied_at", UTCDateTime),
    Column("reply", Text),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_routing_referrals_case", "case_id"),
    Index("ix_routing_referrals_department_status", "department", "status"),
)

outbox = outbox_table(metadata, "routing")
