"""Notify's own tables: the cases it has heard of, and every delivery it owes."""

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

# What notify needs to know of a case, asked of intake when an event first needs it (it reads no
# other service's tables).
notify_cases = Table(
    "notify_cases",
    metadata,
    Column("case_id", String(32), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("external_id", String(128), nullable=False),
    Column("title", String(200), nullable=False),
    Column("street", String(64)),
    Column("category", String(64)),
    Column("workstation", String(64)),  # the member workstation that raised it, if any
)

# One row per (event, recipient, channel): a redelivered event finds its rows and sends nothing.
# pending → sending → sent; or → retrying (broker-delayed) → … → failed (parked for `notify retry`)
deliveries = Table(
    "notify_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("case_id", String(32)),
    Column("recipient", String(120), nullable=False),  # department:cgj, supervisor:m001, citizen, source:…
    Column("channel", String(16), nullable=False),  # email, webhook, wecom, dingtalk, sms, callback
    Column("address", String(500), nullable=False),  # needed to send; shown masked
    Column("subject", String(300), nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    UniqueConstraint("event_id", "recipient", "channel", name="uq_notify_deliveries_once"),
    Index("ix_notify_deliveries_case", "case_id"),
    Index("ix_notify_deliveries_status", "status"),
)

outbox = outbox_table(metadata, "notify")
