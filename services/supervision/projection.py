"""Supervision's projection of cases, built only from bus events (it never reads another
service's tables), and the whole-process record that ``huiying case show`` prints.

Every event is recorded once in the timeline (its ``event_id`` is unique), and only a first
recording changes the projection, so redelivered events change nothing. Events from routing may
overtake the ``case_received`` from intake (different queues): the case row is then started
from what routing's event carries and completed when intake's event arrives.

Routing's events come in one queue per type, so they may also overtake each other. Counts add up
in any order; what the latest event of some kind says (a case's status, rating, lead department
and category; a referral's status and extension) is kept with the time of that event, and an
older event projected later leaves it alone. A step on a referral whose ``case_referred`` has not
been projected yet changes the case at once and waits in the timeline; the ``case_referred``
applies it to the referral when it comes (``early_steps`` counts the case's waiting steps).
"""

import bisect
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace

from sqlalchemy import String, bindparam, delete, func, select, true, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY

from services.common.db import on_postgresql
from services.common.http import NotFound
from services.common.timeutil import iso, now
from services.common.upsert import (
    dialect_insert,
    insert_many_ignoring_duplicates,
    update_from_values,
    update_many,
)
from services.supervision.clusters import bigrams, cluster_key, clusters_to_join, could_be_like, similarity
from services.supervision.models import case_projection, cluster_words, referral_projection, sweep_shards, timeline

ROUTING_EVENTS = (
    "case_referred",
    "case_needs_triage",
    "referral_accepted",
    "referral_returned",
    "extension_requested",
    "extension_granted",
    "extension_refused",
    "referral_replied",
    "feedback_received",
    "case_reopened",
    "case_closed",
)
CASE_STATUS = {
    "case_referred": "referred",
    "case_needs_triage": "triage",
    "case_reopened": "reopened",
    "case_closed": "closed",
}
OPEN_REFERRAL = ("referred", "accepted")  # a deadline that still runs
REFERRAL_STATUS = {"referral_accepted": "accepted", "referral_returned": "returned", "referral_replied": "replied"}
MILESTONE = {"referral_accepted": "accepted_at", "referral_returned": "returned_at", "referral_replied": "replied_at"}
EXTENSION = {"extension_requested": "requested", "extension_granted": "granted", "extension_refused": "refused"}
STEPS = (*REFERRAL_STATUS, *EXTENSION)  # a department's steps on one referral (each names it)
DETAIL_KEYS = (
    "department",
    "department_name",
    "referral_id",
    "reason",
    "rating",
    "working_days",
    "due_at",
    "result",
    "on_time",
    "case_replied",  # whether this reply was the case's (its status came of it)
    "round",
    "reopen_count",
    "source",
    "channel",
    "category",
    "street",
)


def _at(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])  # full precision: the timeline's order


def _timeline_row(event_type: str, event: dict, at: datetime) -> dict:
    details = {k: event[k] for k in DETAIL_KEYS if event.get(k) is not None}
    if event_type == "case_referred":
        details["departments"] = [r["department_name"] for r in event["referrals"]]
    return dict(event_id=event["event_id"], case_id=event["case_id"], event_type=event_type, at=at, details=details)


def _new_case_row(event: dict, at: datetime) -> dict:
    """A case's first row, from whichever event about it comes first."""
    return dict(
        case_id=event["case_id"],
        source=event.get("source") or "",
        title="",
        status="received",
        kind=event.get("kind"),
        category=event.get("category"),
        street=event.get("street"),
        received_at=at,
        updated_at=at,
        changed_at=now(),
        cluster_key=cluster_key(event.get("category"), event.get("street"), event["case_id"]),
        departments=[],
        returns=0,
        extensions=0,
        reopen_count=0,
        unsatisfied_count=0,
    )


def record_events(session, events: list[dict], settings: dict) -> list[str]:
    """Project events of every kind, intake's and routing's, in the caller's transaction; the ids
    of the cases they changed. The run's new and reclassified cases are placed in clusters once,
    at its end (one lock of the shards, one read of their clusters), each as it stands last: a
    case received and reclassified in the same run is placed once, in the cluster of routing's
    category."""
    received = [event for event in events if event["event_type"] == "case_received"]
    from_routing = [event for event in events if event["event_type"] != "case_received"]
    to_place: list = []
    fresh = record_cases_received(session, received, settings, to_place) if received else []
    if from_routing:
        fresh += record_routing_events(session, from_routing, settings, to_place)
    place_in_clusters(session, list({case.case_id: case for case in to_place}.values()), settings)
    return fresh


def _place_now_or_later(session, cases: list, settings: dict, to_place: list | None) -> None:
    """``place_in_clusters`` now, or, when the caller gathers the cases of a run, later."""
    if to_place is None:
        place_in_clusters(session, cases, settings)
    else:
        to_place += cases


def record_case_received(session, event: dict, settings: dict) -> bool:
    """Project a ``case_received`` event; False when this event was already recorded.
    ``settings`` are the supervision policy's (the cluster window and similarity)."""
    return bool(record_cases_received(session, [event], settings))


def record_cases_received(session, events: list[dict], settings: dict, to_place: list | None = None) -> list[str]:
    """Project ``case_received`` events, in a few statements for them all; the ids of the cases
    whose event was recorded now (a redelivered one changes nothing). The new cases are placed in
    clusters now, or added to ``to_place`` when given (``record_events``)."""
    by_event = {event["event_id"]: event for event in sorted(events, key=lambda e: e["case_id"])}
    fresh_ids = set(
        insert_many_ignoring_duplicates(
            session,
            timeline,
            [_timeline_row("case_received", e, datetime.fromisoformat(e["received_at"])) for e in by_event.values()],
            timeline.c.event_id,
        )
    )
    fresh = list({e["case_id"]: e for e in by_event.values() if e["event_id"] in fresh_ids}.values())
    if not fresh:
        return []
    # A new case is written once, whole; a case that one of routing's events started (it
    # overtook this one: the usual order, supervision's queue of intake's events gathers) gets
    # what this event says, keeping what routing's set and this one lacks. One upsert for both,
    # returning each case as it then stands, to be placed in its cluster.
    rows = [
        _new_case_row(e, datetime.fromisoformat(e["received_at"]))
        | dict(source=e["source"], title=e["title"], description=e.get("description"))
        | dict(residents_affected=e.get("residents_affected"))
        for e in fresh
    ]
    c = case_projection.c
    upsert = dialect_insert(session, case_projection)
    given = upsert.excluded
    upsert = upsert.on_conflict_do_update(
        index_elements=[c.case_id],
        set_=dict(
            source=given.source,
            title=given.title,
            description=given.description,
            received_at=given.received_at,
            residents_affected=given.residents_affected,
            kind=func.coalesce(given.kind, c.kind),
            category=func.coalesce(given.category, c.category),
            street=func.coalesce(given.street, c.street),
            changed_at=given.changed_at,
        ),
    ).returning(*CLUSTERING)
    as_stored = session.execute(upsert, rows).all()
    _place_now_or_later(session, as_stored, settings, to_place)
    return [e["case_id"] for e in fresh]


CLUSTERING = (
    case_projection.c.case_id,
    case_projection.c.category,
    case_projection.c.street,
    case_projection.c.received_at,
    case_projection.c.title,
    case_projection.c.description,
    case_projection.c.cluster_key,
)


def register_shards(session, shards) -> None:
    """``register_shard`` for many ``(street, category)``, in one statement."""
    rows = [dict(street=street or "", category=category or "") for street, category in sorted(set(shards), key=str)]
    insert_many_ignoring_duplicates(session, sweep_shards, rows, (sweep_shards.c.street, sweep_shards.c.category))


def _register_and_lock_shards(session, shards: list[tuple[str, str]]) -> None:
    """Register the shards ``(street, category)`` and lock their rows until the transaction
    ends, in one statement and in the order given (an upsert that touches a row takes its lock,
    as SELECT … FOR UPDATE would)."""
    statement = dialect_insert(session, sweep_shards).values([dict(street=s, category=c) for s, c in shards])
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[sweep_shards.c.street, sweep_shards.c.category],
            set_={"street": statement.excluded.street},
        )
    )


class _WordsCache:
    """Each case's two-character words, kept for the cases seen most recently: an open case is
    compared with each new case of its shard for as long as it is open, and its text does not
    change once intake's event has given it (before that its title is empty: not kept)."""

    def __init__(self, size: int = 20_000):
        self.size, self.words = size, OrderedDict()

    def of(self, session, case_ids) -> dict[str, frozenset]:
        """The words of each case, read from the projection for those not kept."""
        found, missing = {}, []
        for case_id in case_ids:
            words = self.words.get(case_id)
            if words is None:
                missing.append(case_id)
            else:
                found[case_id] = words
        c = case_projection.c
        for start in range(0, len(missing), 1000):
            for row in session.execute(
                select(c.case_id, c.title, c.description).where(c.case_id.in_(missing[start : start + 1000]))
            ):
                found[row.case_id] = self.put(row.case_id, row.title, row.description)
        return found

    def put(self, case_id: str, title: str, description: str | None) -> frozenset:
        words = bigrams(f"{title}\n{description or ''}")
        if title:
            self.words[case_id] = words
            self.words.move_to_end(case_id)
            if len(self.words) > self.size:
                self.words.popitem(last=False)
        return words


WORDS = _WordsCache()


@dataclass
class _Peer:
    """An open case a new case may cluster with."""

    received_at: datetime
    case_id: str
    key: str
    words: frozenset


def place_in_clusters(session, cases: list, settings: dict) -> dict[str, str]:
    """Put each case into the cluster of the unresolved cases similar to it (clusters.py),
    merging the clusters it bridges; alone, it starts its own. The shards (street × category)
    are locked in one statement, in one order (two batches never deadlock), their unresolved
    cases read in one query, and the cases join in the order they were received, each seeing
    the ones before it. Returns ``{case id: cluster key}``."""
    c = case_projection.c
    keys, by_shard = {}, defaultdict(list)
    for case in cases:
        if case.category and case.street:
            by_shard[(case.street, case.category)].append(case)
        else:  # no similar cases without both
            keys[case.case_id] = cluster_key(case.category, case.street, case.case_id)
    register_shards(session, [(case.street, case.category) for case in cases if case.case_id in keys])
    if by_shard:
        shards = sorted(by_shard)
        # Two similar cases arriving together (in two batches) must see each other: the shards'
        # rows are the lock.
        _register_and_lock_shards(session, shards)
        window = timedelta(days=settings["cluster_window_days"])
        received = [case.received_at for shard in shards for case in by_shard[shard]]
        span = (min(received) - window, max(received) + window)
        # each arrival's words, made once for reading its shard's clusters and for joining one
        arriving = {
            case.case_id: WORDS.put(case.case_id, case.title, case.description)
            for shard in shards
            for case in by_shard[shard]
        }
        peers, unions = _peers(session, shards, span, arriving, settings, by_shard, window)
        for shard in shards:
            _join(
                session,
                sorted(by_shard[shard], key=lambda case: (case.received_at, case.case_id)),
                arriving,
                peers[shard],
                window,
                settings,
                keys,
                unions,
            )
        unions.save(session)
    # A case is stored with its own key (a cluster of one): only the keys that differ are written.
    stored_as = {case.case_id: getattr(case, "cluster_key", None) for case in cases}
    changed = [
        {"case_id": case_id, "cluster_key": key} for case_id, key in keys.items() if stored_as.get(case_id) != key
    ]
    update_many(session, case_projection, c.case_id, changed)
    return keys


FIRST_COMPARED = 3  # a cluster's most recent cases, which a new case is compared with first


def _peers(session, shards: list, span: tuple, arriving: dict, settings: dict, by_shard: dict, window):
    """``({shard: its open cases a new case may join, in the order they were received}, the
    clusters' words)``. Read in steps, so that a batch does not read every open case of its
    shards: each cluster's ``FIRST_COMPARED`` most recent cases; then every case only of the
    clusters that some arrival is like none of those to and shares enough words with (the
    cluster's words, ``ClusterWords``). Whichever cluster an arrival joins is the same as if it
    were compared with all."""
    c = case_projection.c
    open_in_span = (c.status != "closed", c.received_at.between(*span))
    in_shards = (tuple_(c.street, c.category).in_(shards), *open_in_span)
    # Each cluster's most recent cases and one more, whose presence says the cluster was read in
    # part (one window function: counting each cluster's cases too tripled the query's time).
    rank = (
        func.row_number()
        .over(partition_by=c.cluster_key, order_by=(c.received_at.desc(), c.case_id.desc()))
        .label("rank")
    )
    columns = (c.street, c.category, c.case_id, c.cluster_key, c.received_at, rank)
    if on_postgresql(session):
        # A shard at a time (LATERAL), so that each is a walk of ix_supervision_cases_open_by_cluster
        # in the window's order: over all the shards at once, PostgreSQL gathered their rows from a
        # bitmap scan and sorted them (11.5 ms for 15 shards of 370 open cases; 1.5 ms this way,
        # with the extra case above). The shards go as two arrays, so that the statement is
        # compiled once, not for every list of shards (3 ms a compilation).
        shard_list = (
            func.unnest(
                bindparam("streets", [street for street, _ in shards], type_=ARRAY(String)),
                bindparam("categories", [category for _, category in shards], type_=ARRAY(String)),
            )
            .table_valued("street", "category")
            .render_derived(name="shard")
        )
        ranked = (
            select(*columns)
            .where(c.street == shard_list.c.street, c.category == shard_list.c.category, *open_in_span)
            .lateral()
        )
        query = select(ranked).select_from(shard_list.join(ranked, true()))
    else:
        ranked = select(*columns).where(*in_shards).subquery()
        query = select(ranked)
    first, beyond = [], {}  # beyond: {cluster key: its shard} of the clusters read in part
    for row in session.execute(query.where(ranked.c.rank <= FIRST_COMPARED + 1)):
        if row.rank > FIRST_COMPARED:
            beyond[row.cluster_key] = (row.street, row.category)
        elif row.case_id not in arriving:
            first.append(row)
    words = WORDS.of(session, [row.case_id for row in first])
    threshold = settings["cluster_similarity"]
    by_cluster = defaultdict(list)
    for row in first:
        by_cluster[row.cluster_key].append(row)
    unions = ClusterWords.read(session, beyond)
    unlike = set()  # clusters read in part, which some arrival is like none of those read to
    for key, shard in beyond.items():
        rows = by_cluster[key]
        for arrival in by_shard[shard]:
            arrival_words = arriving[arrival.case_id]
            if any(
                abs(row.received_at - arrival.received_at) <= window
                and similarity(arrival_words, words[row.case_id]) >= threshold
                for row in rows
            ):
                continue
            if key in unions.words and not could_be_like(arrival_words, unions.words[key], threshold):
                continue  # shares too few words with the whole cluster to be like any of its cases
            unlike.add(key)
            break
    rows = [row for row in first if row.cluster_key not in unlike]
    if unlike:
        rest = [
            row
            for row in session.execute(
                select(c.street, c.category, c.case_id, c.cluster_key, c.received_at).where(
                    *in_shards, c.cluster_key.in_(sorted(unlike))
                )
            )
            if row.case_id not in arriving
        ]
        words.update(WORDS.of(session, [row.case_id for row in rest]))
        rows += rest
        unread = [key for key in unlike if key not in unions.words]  # the others' words are known
        if unread:
            unions.read_whole(session, unread)
    peers = defaultdict(list)
    for row in sorted(rows, key=lambda row: (row.received_at, row.case_id)):
        peers[(row.street, row.category)].append(
            _Peer(row.received_at, row.case_id, row.cluster_key, words[row.case_id])
        )
    return peers, unions


class ClusterWords:
    """The words of the clusters a batch meets (``supervision_cluster_words``), kept a superset of
    the words of every case of the cluster, whatever its status or age (a closed case may be
    reopened; an old ticket may arrive late): read for the clusters not read whole, written whole
    for a cluster the first time it has to be read whole, grown as cases join, and united when
    clusters merge. Written at the end of the batch."""

    def __init__(self, words: dict[str, frozenset]):
        self.words, self.changed, self.forgotten = words, set(), set()
        self.appended: dict[str, frozenset] = {}  # joined, not read: added to the row if there is one

    @classmethod
    def read(cls, session, keys) -> "ClusterWords":
        return cls(_stored_words(session, keys))

    def read_whole(self, session, keys) -> None:
        """The words of every case of these clusters, from the projection (and WORDS)."""
        c, members = case_projection.c, defaultdict(list)
        keys = sorted(keys)
        for start in range(0, len(keys), 1000):
            for key, case_id in session.execute(
                select(c.cluster_key, c.case_id).where(c.cluster_key.in_(keys[start : start + 1000]))
            ):
                members[key].append(case_id)
        words = WORDS.of(session, [case_id for ids in members.values() for case_id in ids])
        for key in keys:
            self.words[key] = frozenset().union(*(words[case_id] for case_id in members[key]))
            self.changed.add(key)

    def grow(self, key: str, more: frozenset) -> None:
        """A case with the words ``more`` joined the cluster ``key``."""
        if key in self.words:
            if not more <= self.words[key]:
                self.words[key] |= more
                self.changed.add(key)
        elif key not in self.forgotten:
            self.appended[key] = self.appended.get(key, frozenset()) | more

    def merge(self, session, into: str, keys: list[str]) -> None:
        """The clusters ``keys`` (``into`` among them) become the one ``into``, whose words are
        then all of theirs. Called before their cases move: a cluster whose words this batch has
        not met is read from its row, or whole when it has none (a small one, as a rule). Merged
        words are kept, not forgotten: forgotten, a cluster of thousands that merged was read
        whole again on its next arrival unlike its recent cases."""
        unknown = [key for key in keys if key not in self.words]
        if unknown:
            self.words.update(_stored_words(session, unknown))
            unread = [key for key in unknown if key not in self.words]
            if unread:
                self.read_whole(session, unread)
        merged = frozenset().union(*(self.words[key] | self.appended.pop(key, frozenset()) for key in keys))
        self.forget([key for key in keys if key != into])
        self.words[into] = merged
        self.changed.add(into)

    def forget(self, keys) -> None:
        for key in keys:
            self.words.pop(key, None)
            self.appended.pop(key, None)
            self.changed.discard(key)
            self.forgotten.add(key)

    def save(self, session) -> None:
        t = cluster_words.c
        if self.forgotten:
            session.execute(delete(cluster_words).where(t.cluster_key.in_(sorted(self.forgotten))))
        rows = [
            dict(cluster_key=key, words="\n".join(sorted(self.words[key])), updated_at=now())
            for key in sorted(self.changed)
        ]
        if rows:
            statement = dialect_insert(session, cluster_words)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=[t.cluster_key],
                    set_={"words": statement.excluded.words, "updated_at": statement.excluded.updated_at},
                ),
                rows,
            )
        if self.appended:  # only a cluster with a row has one to keep whole (repeated words are harmless)
            rows = [
                dict(cluster_key=key, words="\n".join(sorted(more)), updated_at=now())
                for key, more in sorted(self.appended.items())
            ]
            if on_postgresql(session):
                # One statement: most of these clusters have no row (small ones), and an UPDATE
                # per cluster was supervision's most frequent statement (bench/README.md, 3 Dec).
                appended = {"words": "supervision_cluster_words.words || chr(10) || changes.words"}
                update_from_values(
                    session, cluster_words, t.cluster_key, rows, appended | {"updated_at": "changes.updated_at"}
                )
            else:
                session.execute(
                    update(cluster_words)
                    .where(t.cluster_key == bindparam("b_key"))
                    .values(words=t.words + "\n" + bindparam("b_more"), updated_at=bindparam("b_at")),
                    [{"b_key": r["cluster_key"], "b_more": r["words"], "b_at": r["updated_at"]} for r in rows],
                )


def _stored_words(session, keys) -> dict[str, frozenset]:
    """``{cluster key: its words}`` of those of ``keys`` that have a row in ``supervision_cluster_words``."""
    found, keys = {}, sorted(keys)
    for start in range(0, len(keys), 1000):
        for key, text in session.execute(
            select(cluster_words.c.cluster_key, cluster_words.c.words).where(
                cluster_words.c.cluster_key.in_(keys[start : start + 1000])
            )
        ):
            found[key] = frozenset(text.split("\n"))
    return found


def _join(
    session,
    arrivals: list,
    arriving: dict,
    peers: list[_Peer],
    window: timedelta,
    settings: dict,
    keys: dict,
    unions: ClusterWords,
) -> None:
    """The arrivals of one shard join its clusters, in order (``arriving``: each one's words);
    ``keys`` gets each one's key."""
    for case in arrivals:
        words = arriving[case.case_id]
        joined = clusters_to_join(
            words,
            ((peer.key, peer) for peer in peers if abs(peer.received_at - case.received_at) <= window),
            settings["cluster_similarity"],
        )
        key = joined[0] if joined else cluster_key(case.category, case.street, case.case_id)
        if joined[1:]:  # this case bridges clusters: they become one
            unions.merge(session, key, joined)
            session.execute(
                update(case_projection)
                .where(case_projection.c.cluster_key.in_(joined[1:]))
                .values(cluster_key=key, changed_at=now())
            )
            for peer in peers:
                if peer.key in joined[1:]:
                    peer.key = key
            keys.update({case_id: key for case_id, old in keys.items() if old in joined[1:]})
        if joined:
            unions.grow(key, words)
        keys[case.case_id] = key
        bisect.insort(peers, _Peer(case.received_at, case.case_id, key, words), key=_order)


def _order(peer: _Peer):
    return (peer.received_at, peer.case_id)


def record_routing_event(session, event: dict, settings: dict) -> bool:
    """Project one of routing's events; False when it was already recorded."""
    return bool(record_routing_events(session, [event], settings))


def record_routing_events(session, events: list[dict], settings: dict, to_place: list | None = None) -> list[str]:
    """Project routing's events, in a few statements for them all; the ids of the cases changed
    by an event recorded now (a redelivered one changes nothing). Each case's events are applied
    in the order they occurred, to its row as read under lock: two events about one case (two
    returns, say) never both count from the same value, and rows are locked in one order, so two
    batches cannot deadlock. A reclassified case moves to its new cluster now, or is added to
    ``to_place`` when given."""
    c = case_projection.c
    unique = {event["event_id"]: event for event in events}  # an event delivered twice in one batch counts once
    ordered = sorted(unique.values(), key=lambda e: (e["case_id"], e["occurred_at"]))
    recorded = set(
        insert_many_ignoring_duplicates(
            session, timeline, [_timeline_row(e["event_type"], e, _at(e)) for e in ordered], timeline.c.event_id
        )
    )
    fresh = [e for e in ordered if e["event_id"] in recorded]
    if not fresh:
        return []
    case_ids = sorted({e["case_id"] for e in fresh})
    cases = {
        row.case_id: row._asdict()
        for row in session.execute(
            select(case_projection).where(c.case_id.in_(case_ids)).order_by(c.case_id).with_for_update()
        )
    }
    # Events that overtook intake's case_received start their case: its row is made here and
    # written once, whole, when their changes are applied (_insert_started). An INSERT then an
    # UPDATE of each such case had been two of the projection's costliest statements, on the way
    # of every case to the board (bench/README.md, 3 Dec).
    overtaking = {e["case_id"]: e for e in reversed(fresh) if e["case_id"] not in cases}
    for case_id, event in overtaking.items():
        cases[case_id] = _started_row(event)
    categories_before = {case_id: case["category"] for case_id, case in cases.items()}
    changed_columns = defaultdict(set)
    new_referrals, referral_changes, due_changed = [], {}, set()
    as_of = _referrals_as_of(session, fresh)  # read under the cases' locks, which cover their referrals
    applied = set()  # the steps applied to their referral now
    out_of_order = set()  # cases with a referral projected after a later one
    for event in fresh:
        case_id, at = event["case_id"], _at(event)
        case = cases[case_id]
        if event["event_type"] == "case_referred" and case["lead_at"] is not None and at < case["lead_at"]:
            out_of_order.add(case_id)
        values, referrals = _projected(event, case, at)
        if event["event_type"] in STEPS:
            if event["referral_id"] in as_of:
                _change_referral(as_of, referral_changes, event, at)
                applied.add(event["event_id"])
                due_changed.add(case_id)
            else:  # it overtook the case_referred that makes its referral, which will apply it
                values["early_steps"] = case["early_steps"] + 1
        case.update(values)
        changed_columns[case_id] |= values.keys()
        new_referrals += referrals
        as_of.update((r["referral_id"], {**r, "status_at": None, "extension_at": None}) for r in referrals)
        if referrals:
            due_changed.add(case_id)
    made = {r["referral_id"] for r in new_referrals}
    waiting = sorted({r["case_id"] for r in new_referrals if cases[r["case_id"]]["early_steps"]})
    for step in _early_steps(session, waiting, made, applied) if waiting else []:
        _change_referral(as_of, referral_changes, step, step["at"])
        cases[step["case_id"]]["early_steps"] -= 1
        changed_columns[step["case_id"]].add("early_steps")
    insert_many_ignoring_duplicates(session, referral_projection, new_referrals, referral_projection.c.referral_id)
    if out_of_order:
        for case_id, departments in _departments_in_referral_order(session, sorted(out_of_order)).items():
            cases[case_id]["departments"] = departments
            changed_columns[case_id].add("departments")
    update_many(
        session,
        referral_projection,
        referral_projection.c.referral_id,
        [{"referral_id": referral_id, **values} for referral_id, values in referral_changes.items()],
    )
    # The nearest deadline goes with the case's other changes (one write of the row instead of two).
    for case_id, nearest in _nearest_due(as_of, due_changed).items():
        if nearest != cases[case_id]["nearest_due"]:
            cases[case_id]["nearest_due"] = nearest
            changed_columns[case_id].add("nearest_due")
    if overtaking:
        _insert_started(session, [cases[case_id] for case_id in sorted(overtaking)])
    update_many(
        session,
        case_projection,
        c.case_id,
        [
            {"case_id": case_id, **{k: cases[case_id][k] for k in columns}}
            for case_id, columns in changed_columns.items()
            if case_id not in overtaking
        ],
    )
    reclassified = [case_id for case_id in case_ids if cases[case_id]["category"] != categories_before[case_id]]
    if reclassified:  # another shard and cluster
        moved = [SimpleNamespace(**cases[case_id]) for case_id in reclassified]
        _place_now_or_later(session, moved, settings, to_place)
    return case_ids


class StartedMeanwhile(Exception):
    """Another worker stored a case that this run's events were starting (a replica projecting
    intake's event about it): the run fails, and its events, projected again, apply to that row."""


# Every column of a case's row, as the table's defaults give it: a started row names them all.
STARTED_DEFAULTS = {column.name: None for column in case_projection.c} | dict(on_agenda=False, early_steps=0)


def _started_row(event: dict) -> dict:
    """The whole row of a case that ``event`` starts, every column given (as the INSERT would)."""
    return STARTED_DEFAULTS | _new_case_row(event, _at(event))


def _insert_started(session, rows: list[dict]) -> None:
    """Insert the cases routing's events started, in case order, as every writer of these rows
    takes them (no deadlock with intake's event), and register their shards."""
    stored = set(insert_many_ignoring_duplicates(session, case_projection, rows, case_projection.c.case_id))
    lost = [row["case_id"] for row in rows if row["case_id"] not in stored]
    if lost:
        raise StartedMeanwhile(f"stored by another worker meanwhile, to be projected again: {', '.join(lost)}")
    register_shards(session, [(row["street"], row["category"]) for row in rows])


def _departments_in_referral_order(session, case_ids: list[str]) -> dict[str, list[str]]:
    """Each case's departments in the order they were first referred to (routing numbers a case's
    referrals ``<case id>-R1``, ``-R2`` … as it makes them)."""
    r = referral_projection.c
    rows = session.execute(select(r.case_id, r.referral_id, r.department).where(r.case_id.in_(case_ids)))
    by_case = defaultdict(list)
    for row in sorted(rows, key=lambda row: int(row.referral_id.rsplit("-R", 1)[1])):
        by_case[row.case_id].append(row.department)
    return {case_id: list(dict.fromkeys(departments)) for case_id, departments in by_case.items()}


def _referrals_as_of(session, events: list[dict]) -> dict[str, dict]:
    """As they stand, the referrals of the cases of ``events`` that name a referral or make some:
    their case, status and due date, and when their status and extension were set and the latest
    event about them occurred. Every referral of those cases, so that their nearest deadline is
    known once the events are applied (``_nearest_due``)."""
    case_ids = sorted({e["case_id"] for e in events if e.get("referral_id") or e.get("referrals")})
    if not case_ids:
        return {}
    r = referral_projection.c
    rows = session.execute(
        select(r.referral_id, r.case_id, r.status, r.due_at, r.status_at, r.extension_at, r.updated_at).where(
            r.case_id.in_(case_ids)
        )
    )
    return {row.referral_id: row._asdict() for row in rows}


def _nearest_due(as_of: dict, case_ids) -> dict[str, datetime | None]:
    """``{case id: the earliest deadline among its open referrals}``, from the referrals as of now."""
    nearest = dict.fromkeys(case_ids)
    for referral in as_of.values():
        case_id, due_at = referral["case_id"], referral["due_at"]
        if case_id in nearest and referral["status"] in OPEN_REFERRAL:
            nearest[case_id] = due_at if nearest[case_id] is None else min(nearest[case_id], due_at)
    return nearest


def _early_steps(session, case_ids: list[str], referral_ids: set[str], applied: set[str]) -> list[dict]:
    """The steps on ``referral_ids`` (just made) that the timeline of ``case_ids`` holds and were
    not ``applied`` yet — they came before their referral — as events, in the order they occurred."""
    t = timeline.c
    rows = session.execute(
        select(t.event_id, t.case_id, t.event_type, t.at, t.details)
        .where(t.case_id.in_(case_ids), t.event_type.in_(STEPS))
        .order_by(t.at, t.id)
    )
    return [
        {
            **(row.details or {}),
            "event_id": row.event_id,
            "case_id": row.case_id,
            "event_type": row.event_type,
            "at": row.at,
        }
        for row in rows
        if (row.details or {}).get("referral_id") in referral_ids and row.event_id not in applied
    ]


def _change_referral(as_of: dict, referral_changes: dict, step: dict, at: datetime) -> None:
    """Add what ``step`` changes of its referral to ``referral_changes`` (and to ``as_of``)."""
    referral_id = step["referral_id"]
    values = _newer_only(_referral_values(step, at), as_of[referral_id], at)
    as_of[referral_id].update(values)
    referral_changes.setdefault(referral_id, {}).update(values)


def _referral_values(step: dict, at: datetime) -> dict:
    """What a department's step sets of its referral."""
    event_type, values = step["event_type"], {}
    if event_type in REFERRAL_STATUS:
        values["status"] = REFERRAL_STATUS[event_type]
    if event_type in EXTENSION:
        values["extension"] = EXTENSION[event_type]
    if event_type == "extension_granted":
        values["due_at"] = datetime.fromisoformat(step["due_at"])
    if event_type in MILESTONE:
        values[MILESTONE[event_type]] = at
    if event_type == "referral_replied":
        values["replied_on_time"] = bool(step.get("on_time"))
    return values


def _newer_only(referral_values: dict, as_of: dict, at: datetime) -> dict:
    """``referral_values`` without the status and the extension when an event later than ``at``
    set them already, with the times they are set as of; a granted extension only ever moves the
    due date later (a second one may be projected before the first)."""
    kept = dict(referral_values, updated_at=max(at, as_of["updated_at"]))
    for field in ("status", "extension"):
        if field not in kept:
            continue
        if as_of[f"{field}_at"] is not None and at < as_of[f"{field}_at"]:
            del kept[field]
        else:
            kept[f"{field}_at"] = at
    if "due_at" in kept:
        kept["due_at"] = max(kept["due_at"], as_of["due_at"])
    return kept


def _projected(event: dict, case: dict, at: datetime) -> tuple[dict, list[dict]]:
    """What one of routing's events changes of its case, and the referrals it adds, given the case
    as it stands. What an event later than this one set already stays: the status (and the
    closing time that goes with it), the rating, the lead department and kind, the category."""
    event_type = event["event_type"]
    values = {"updated_at": max(at, case["updated_at"]), "changed_at": now()}
    referrals = []

    def latest(what: str) -> bool:
        """Whether no event later than this one set ``what`` (status, rated, lead, category)."""
        return case[f"{what}_at"] is None or at >= case[f"{what}_at"]

    status = CASE_STATUS.get(event_type)
    if event_type == "referral_replied" and event.get("case_replied"):
        status = "replied"
    if status and latest("status"):
        values.update(status=status, status_at=at)
        if event_type == "case_closed":
            values["closed_at"] = at
        elif event_type == "case_reopened":
            values["closed_at"] = None
    if event_type in ("case_referred", "case_needs_triage") and event.get("category") and latest("category"):
        values.update(category=event["category"], category_at=at)
    if event_type == "case_referred":
        known, named = case["departments"] or [], [r["department"] for r in event["referrals"]]
        if latest("lead"):
            values.update(lead_department=named[0], kind=event.get("kind") or case["kind"], lead_at=at)
        # (else a later referral is projected already: record_routing_events puts the departments
        # back in the order they were first referred to, once this one's referrals are stored)
        values.update(
            departments=list(dict.fromkeys([*known, *named])),
            first_referred_at=min(case["first_referred_at"] or at, at),
            # round n comes of the (n-1)th reopening, whether or not its case_reopened is here yet
            reopen_count=max(case["reopen_count"], event["round"] - 1),
        )
        referrals = [
            dict(
                referral_id=r["referral_id"],
                case_id=event["case_id"],
                department=r["department"],
                department_name=r.get("department_name"),
                is_lead=int(bool(r.get("lead"))),
                round=event["round"],
                status="referred",
                referred_at=at,
                due_at=datetime.fromisoformat(r["due_at"]),
                updated_at=at,
            )
            for r in event["referrals"]
        ]
    elif event_type == "referral_returned":
        values["returns"] = case["returns"] + 1
    elif event_type == "extension_requested":
        values["extensions"] = case["extensions"] + 1
    elif event_type == "feedback_received":
        values["unsatisfied_count"] = case["unsatisfied_count"] + (event["rating"] == "不满意")
        if latest("rated"):
            values.update(last_rating=event["rating"], rated_at=at)
    elif event_type == "case_reopened":
        values["reopen_count"] = max(case["reopen_count"], event["reopen_count"])
    return values, referrals


def case_record(session, case_id: str) -> dict:
    """The whole-process record of one case (the shape of ``huiying case show --json``)."""
    row = session.execute(select(case_projection).where(case_projection.c.case_id == case_id)).first()
    if row is None:
        raise NotFound(f"no case {case_id!r}")
    steps = session.execute(
        select(timeline.c.at, timeline.c.event_type, timeline.c.details)
        .where(timeline.c.case_id == case_id)
        .order_by(timeline.c.at, timeline.c.id)
    ).all()
    referral_rows = session.execute(
        select(referral_projection)
        .where(referral_projection.c.case_id == case_id)
        .order_by(referral_projection.c.round, referral_projection.c.referred_at, referral_projection.c.referral_id)
    ).all()
    return {
        "id": row.case_id,
        "source": row.source,
        "title": row.title,
        "status": row.status,
        "kind": row.kind,
        "category": row.category,
        "street": row.street,
        "received_at": iso(row.received_at),
        "referrals": [
            {
                "id": r.referral_id,
                "department": r.department,
                "department_name": r.department_name or r.department,
                "lead": bool(r.is_lead),
                "round": r.round,
                "status": r.status,
                "extension": r.extension,
                "referred_at": iso(r.referred_at),
                "due_at": iso(r.due_at),
            }
            for r in referral_rows
        ],
        "returns": row.returns,
        "extensions": row.extensions,
        "reopen_count": row.reopen_count,
        "last_rating": row.last_rating,
        "timeline": [{"at": iso(s.at), "event": s.event_type, "details": s.details or {}} for s in steps],
        "escalations": [],
    }
