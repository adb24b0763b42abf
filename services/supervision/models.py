"""Supervision's own tables: its projection of cases, built only from bus events."""

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from services.common.db import UTCDateTime
from services.common.outbox import outbox_table

metadata = MetaData()

case_projection = Table(
    "supervision_cases",
    metadata,
    Column("case_id", String(32), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("title", String(200), nullable=False),
    Column("description", Text),  # for finding similar cases
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
    # Similar cases (类案) share a cluster key, kept as cases arrive (clusters.py), so evaluating
    # a case never re-compares texts; the key names the cluster's first case.
    Column("cluster_key", String(120)),
    # When supervision last changed this row (its own clock, not the event's): an incremental
    # sweep re-evaluates only the clusters with a case changed since its previous pass.
    Column("changed_at", UTCDateTime),
    # Kept here, not joined at each evaluation, so a sweep reads one table: the earliest deadline
    # among the case's open referrals, and whether an agenda item links it.
    Column("nearest_due", UTCDateTime),
    Column("on_agenda", Boolean, nullable=False, server_default=false()),
    Column("closed_at", UTCDateTime),  # set by case_closed, cleared by case_reopened (the board's weekly counts)
    # When the event that set ``status`` (and ``closed_at``) occurred: routing's events come in one
    # queue per type, so a case_reopened may be projected after the case_referred of the round it
    # opened; an event older than this changes neither (projection._projected). The same for
    # ``last_rating``, for ``lead_department`` and ``kind`` (the latest case_referred's), and for
    # ``category``.
    Column("status_at", UTCDateTime),
    Column("rated_at", UTCDateTime),
    Column("lead_at", UTCDateTime),
    Column("category_at", UTCDateTime),
    # Steps on a referral projected before the case_referred that makes it, which applies them.
    Column("early_steps", Integer, nullable=False, server_default="0"),
    Index("ix_supervision_cases_shard", "street", "category"),  # a sweep shard's cases
    Index("ix_supervision_cases_cluster", "cluster_key"),
    Index("ix_supervision_cases_changed", "changed_at"),
    Index("ix_supervision_cases_received", "received_at"),
)
# A shard's open cases in the order placing a new case reads them (projection._peers: each
# cluster's most recent cases first), so that read is a walk of this index, not a sort: only open
# cases, which stay few while closed ones pile up.
Index(
    "ix_supervision_cases_open_by_cluster",
    case_projection.c.street,
    case_projection.c.category,
    case_projection.c.cluster_key,
    case_projection.c.received_at.desc(),
    case_projection.c.case_id.desc(),
    postgresql_where=case_projection.c.status != "closed",
    sqlite_where=case_projection.c.status != "closed",
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
    # The milestones the board's per-department rates are counted from (reports.py).
    Column("accepted_at", UTCDateTime),
    Column("returned_at", UTCDateTime),
    Column("replied_at", UTCDateTime),
    Column("replied_on_time", Boolean),  # replied by the due date then in force (routing says)
    # When the events that set ``status`` and ``extension`` occurred: one older than these, come
    # late from another queue, changes neither (as status_at of a case).
    Column("status_at", UTCDateTime),
    Column("extension_at", UTCDateTime),
    Index("ix_supervision_referrals_case", "case_id"),
    Index("ix_supervision_referrals_referred", "referred_at"),
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

# Every escalation decision, once: the rule, the ruleset version, the facts it saw, the time.
# The unique key is what makes each action happen once however often (and on however many
# replicas) evaluation runs; dedupe_key distinguishes e.g. reminders for different deadlines.
decisions = Table(
    "supervision_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_id", String(100), nullable=False),
    Column("action", String(40), nullable=False),
    Column("scope", String(10), nullable=False),  # case or cluster
    Column("subject_id", String(120), nullable=False),  # the case id, or the cluster's key
    Column("dedupe_key", String(64), nullable=False),
    Column("case_ids", JSON, nullable=False),
    Column("agenda_id", String(20)),
    Column("ruleset_version", String(12), nullable=False),
    Column("facts", JSON, nullable=False),
    Column("evaluated_at", UTCDateTime, nullable=False),  # the "now" of the evaluation
    Column("recorded_at", UTCDateTime, nullable=False),
    UniqueConstraint("rule_id", "action", "subject_id", "dedupe_key", name="uq_supervision_decisions_once"),
    Index("ix_supervision_decisions_subject", "subject_id"),  # what a case or cluster was decided
)

# The democratic-supervision agenda (民主监督议题库), joint supervision (联合督查督办) and special
# inspections (专项视察监督): proposed → scheduled → under_supervision → concluded (with findings).
agenda = Table(
    "supervision_agenda",
    metadata,
    Column("id", String(20), primary_key=True),  # AG-2026-0001
    Column("kind", String(24), nullable=False),  # agenda, joint_supervision, special_inspection
    Column("status", String(20), nullable=False),
    Column("rule_id", String(100), nullable=False),
    Column("scope", String(10), nullable=False),
    Column("subject_id", String(120), nullable=False),
    Column("title", String(300), nullable=False),
    Column("scheduled_for", String(10)),
    Column("findings", Text),
    Column("history", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("kind", "rule_id", "subject_id", name="uq_supervision_agenda_subject"),
)

agenda_cases = Table(
    "supervision_agenda_cases",
    metadata,
    Column("agenda_id", String(20), ForeignKey("supervision_agenda.id"), primary_key=True),
    Column("case_id", String(32), primary_key=True),
    Column("added_at", UTCDateTime, nullable=False),
    Index("ix_supervision_agenda_cases_case", "case_id"),
)

counters = Table(
    "supervision_counters",
    metadata,
    Column("name", String(20), primary_key=True),
    Column("last_number", Integer, nullable=False),
)

# Each version of the rule files that decided, and what changed from the one before.
rule_versions = Table(
    "supervision_rule_versions",
    metadata,
    Column("version", String(12), primary_key=True),
    Column("loaded_at", UTCDateTime, nullable=False),
    Column("files", JSON, nullable=False),
    Column("changes", JSON, nullable=False),
)

# The periodic sweep, shared among replicas: one row per (street, category) — similar cases never
# cross one, so a shard is a whole set of clusters. A replica leases a shard before sweeping it;
# a killed replica's lease runs out and another takes the shard over.
sweep_shards = Table(
    "supervision_sweep_shards",
    metadata,
    Column("street", String(64), primary_key=True),  # '' for cases with no street
    Column("category", String(64), primary_key=True),  # '' for cases with no category
    Column("owner", String(100)),
    Column("lease_until", UTCDateTime),
    Column("swept_at", UTCDateTime),
    Column("swept_by", String(100)),
    Column("evaluated", Integer),
    # The time-based facts (working days to a deadline, overdue, since referral) change only when
    # a working day begins in China, so a shard is swept whole once a working day and whenever the
    # rules change; in between, a pass takes only the clusters changed since the last pass began.
    Column("started_at", UTCDateTime),  # when the last completed pass began
    Column("whole_on", String(10)),  # the China date of the last whole pass (2026-11-25)
    Column("whole_version", String(12)),  # and the ruleset version it used
)

# Every two-character word of a cluster's cases, for the clusters of more cases than a new case is
# compared with first (projection._peers): a new case sharing too few of these words with a cluster
# can be like none of its cases, so the cluster's cases need not be read. Words are only ever
# added (a closed case's stay): a superset only lets more clusters through, never fewer. A cluster
# with no row here is read whole the first time it is needed, and its row is written then.
cluster_words = Table(
    "supervision_cluster_words",
    metadata,
    Column("cluster_key", String(120), primary_key=True),
    Column("words", Text, nullable=False),  # the words, separated by newlines
    Column("updated_at", UTCDateTime, nullable=False),
)

outbox = outbox_table(metadata, "supervision")
