"""Similar cases arriving in batches, on PostgreSQL: however the cases are batched, and although a
batch compares each arrival first with a few recent cases of each cluster (reading every case only
of the clusters it is like none of those to), the clusters are exactly the connected groups that
comparing every pair at once gives (clusters.clusters, which the migration that introduced kept
clusters uses)."""

import random
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from services.common.timeutil import CST
from services.supervision import projection
from services.supervision.clusters import Member, bigrams, clusters
from services.supervision.models import case_projection

SETTINGS = {"cluster_window_days": 30, "cluster_similarity": 0.2}
START = datetime(2026, 9, 1, 9, 0, tzinfo=CST)
# Texts that share words in chains (A~B, B~C, not A~C) and some that are like nothing else.
TOPICS = [
    "路灯不亮夜间出行不便",
    "夜间出行不便路口太暗",
    "路口太暗需要加装路灯设施",
    "垃圾清运不及时气味难闻",
    "气味难闻影响居民休息",
    "噪音扰民夜间施工",
    "断头路多年未打通",
    "公交线路调整换乘不便",
]


def scenario(rng: random.Random, count: int) -> list[dict]:
    """``count`` case_received events in 3 streets × 2 categories, over 50 days (so the 30-day
    window matters), their texts drawn from the topics, some with a unique tail."""
    events = []
    for i in range(count):
        text = rng.choice(TOPICS) + (f"编号{rng.randrange(10**6)}独有内容" * rng.randrange(0, 3))
        received = START + timedelta(days=rng.uniform(0, 50))
        events.append(
            {
                "event_id": str(uuid.uuid4()),
                "event_type": "case_received",
                "occurred_at": received.isoformat(),
                "case_id": f"LG-2026-{i:06d}",
                "source": "hotline-12345",
                "channel": "amqp",
                "title": text[:12],
                "description": text[12:],
                "street": rng.choice(["nanwan", "buji", "pinghu"]),
                "category": rng.choice(["traffic", "environment"]),
                "received_at": received.isoformat(),
            }
        )
    return events


@pytest.fixture(autouse=True)
def fresh_words_cache(monkeypatch):
    """The words kept by case id (projection.WORDS) are those of another test's cases of the same
    ids: each test starts with none kept."""
    monkeypatch.setattr(projection, "WORDS", projection._WordsCache())


def partition(groups) -> set:
    return {frozenset(group) for group in groups}


def sqlite_engine():
    """The embedded database (the demo's and the quick start's), which reads a shard's clusters with
    another query than PostgreSQL's (projection._peers)."""
    from sqlalchemy import create_engine

    from services.supervision.models import metadata

    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    return engine


def assert_clusters_of_all_pairs(sessions, events):
    """The clusters kept are the connected groups of comparing every pair of ``events`` at once."""
    with sessions() as session:
        stored = session.execute(select(case_projection.c.case_id, case_projection.c.cluster_key)).all()
    kept: dict = {}
    for case_id, key in stored:
        kept.setdefault(key, set()).add(case_id)

    members = [
        Member(
            e["case_id"],
            e["category"],
            e["street"],
            datetime.fromisoformat(e["received_at"]),
            bigrams(f"{e['title']}\n{e['description']}"),
        )
        for e in events
    ]
    all_pairs = {key: set(ids) for key, ids in clusters(members, 30, 0.2).values()}
    assert partition(kept.values()) == partition(all_pairs.values())
    assert max(len(group) for group in kept.values()) > projection.FIRST_COMPARED  # big clusters were met


def record_in_batches(sessions, rng, events):
    position = 0
    while position < len(events):  # batches of 1 to 40, as the queue hands them over
        size = rng.randint(1, 40)
        with sessions.begin() as session:
            projection.record_events(session, events[position : position + size], SETTINGS)
        position += size


@pytest.mark.parametrize("seed", [1, 2, 3, "sqlite"])
def test_batched_clusters_are_those_of_all_pairs(db, seed):
    rng = random.Random(7 if seed == "sqlite" else seed)
    events = scenario(rng, 160)
    sessions = sessionmaker(sqlite_engine() if seed == "sqlite" else db)
    record_in_batches(sessions, rng, events)
    assert_clusters_of_all_pairs(sessions, events)


def referral_of(received: dict) -> dict:
    """Routing's case_referred for a case_received event of ``scenario``, a minute later."""
    at = datetime.fromisoformat(received["received_at"]) + timedelta(minutes=1)
    case_id = received["case_id"]
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "case_referred",
        "occurred_at": at.isoformat(),
        "case_id": case_id,
        "category": received["category"],
        "street": received["street"],
        "kind": "referral",
        "round": 1,
        "referrals": [
            {
                "referral_id": f"{case_id}-R1",
                "department": "cgj",
                "department_name": "城管局",
                "lead": True,
                "due_at": (at + timedelta(days=10)).isoformat(),
            }
        ],
    }


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_cases_whose_referral_came_first_are_completed_and_clustered_by_intakes_event(db, database):
    """Supervision's queue of intake's events gathers for a while, so routing's case_referred
    usually starts a case's row (with no text yet) and intake's case_received completes it: the
    case then has intake's title and moment, and the clusters are still those of all pairs."""
    rng = random.Random(11)
    events = scenario(rng, 160)
    referred_first = rng.sample(events, 100)
    sessions = sessionmaker(sqlite_engine() if database == "sqlite" else db)
    record_in_batches(sessions, rng, [referral_of(e) for e in referred_first])
    record_in_batches(sessions, rng, events)
    assert_clusters_of_all_pairs(sessions, events)
    c = case_projection.c
    with sessions() as session:
        rows = {row.case_id: row for row in session.execute(select(c.case_id, c.title, c.received_at, c.status))}
    for event in events:
        row = rows[event["case_id"]]
        assert row.title == event["title"]
        assert row.received_at == datetime.fromisoformat(event["received_at"])
        assert row.status == ("referred" if event in referred_first else "received")


def arrive_alone(sessions, number: int, text: str, day: float) -> str:
    """A case of the chain's shard received ``day`` days after START, in its own batch: its cluster key."""
    received = START + timedelta(days=day)
    event = {
        "event_id": str(uuid.uuid4()),
        "case_id": f"LG-2026-{number:06d}",
        "source": "hotline-12345",
        "channel": "amqp",
        "title": text[:12],
        "description": text[12:],
        "street": "buji",
        "category": "traffic",
        "received_at": received.isoformat(),
    }
    with sessions.begin() as session:
        projection.record_cases_received(session, [event], SETTINGS)
    with sessions() as session:
        return session.execute(
            select(case_projection.c.cluster_key).where(case_projection.c.case_id == event["case_id"])
        ).scalar()


def test_a_cluster_read_whole_once_is_then_skipped_by_its_words_and_still_joined_through_an_old_case(db, monkeypatch):
    sessions = sessionmaker(db)
    read_whole = []
    real = projection.ClusterWords.read_whole
    monkeypatch.setattr(
        projection.ClusterWords, "read_whole", lambda self, s, keys: (read_whole.append(set(keys)), real(self, s, keys))
    )

    def arrive(number: int, text: str, day: float):
        return arrive_alone(sessions, number, text, day)

    # The oldest case shares words with the second only; each later one with the one before it.
    chain = [
        "甲乙丙丁戊己庚辛",
        "丁戊己庚辛壬癸子",
        "庚辛壬癸子丑寅卯",
        "癸子丑寅卯辰巳午",
        "寅卯辰巳午未申酉",
        "巳午未申酉戌亥天",
    ]
    keys = {arrive(n, text, day=n * 0.1) for n, text in enumerate(chain)}
    assert len(keys) == 1  # one cluster of six, more than FIRST_COMPARED
    [cluster] = keys
    assert read_whole == []  # each new case was like the most recent ones

    assert arrive(10, "公交线路调整换乘不便等车太久", day=1) != cluster
    assert read_whole == [{cluster}]  # unlike its recent cases: read whole, and its words kept
    with sessions() as session:
        assert session.execute(select(projection.cluster_words.c.cluster_key)).scalars().all() == [cluster]

    assert arrive(11, "地铁站缺少除颤仪急救设备", day=1.1) != cluster
    assert read_whole == [{cluster}]  # too few of its words: not read again

    # Like only the oldest case (not among the three most recent): its words let it through.
    assert arrive(12, "甲乙丙丁戊己庚辛", day=1.2) == cluster

    # Like the cluster's most recent case and the lone case 10: the two merge, and the merged
    # cluster keeps the words of both, so that the next arrival unlike its recent cases is
    # still sorted out by its words, without reading all its cases again.
    merged = arrive(13, "巳午未申酉戌亥天公交线路调整换乘", day=1.3)
    with sessions() as session:
        lone = session.execute(
            select(case_projection.c.cluster_key).where(case_projection.c.case_id == "LG-2026-000010")
        ).scalar()
        t = projection.cluster_words.c
        [(key, words)] = session.execute(select(t.cluster_key, t.words))
    assert lone == merged and key == merged
    assert set(words.split("\n")) >= bigrams("公交线路调整换乘不便等车太久") | bigrams("甲乙丙丁戊己庚辛")
    reads = len(read_whole)
    assert arrive(14, "地铁站缺少除颤仪急救设备", day=1.4) != merged
    assert len(read_whole) == reads  # the merged cluster's words sufficed
    assert arrive(15, "甲乙丙丁戊己庚辛", day=1.5) == merged  # and still lead to its oldest case


def test_a_case_joining_a_cluster_not_read_this_batch_adds_its_words_to_the_cluster_s_row(db):
    """A cluster with a row of words, down to fewer open cases than ``FIRST_COMPARED``: a case
    joining it is compared with all of them, the row is not read, and the case's words are
    appended to it (ClusterWords.appended), so that the row stays a superset of its cases' words."""
    sessions = sessionmaker(db)
    chain = ["甲乙丙丁戊己庚辛", "丁戊己庚辛壬癸子", "庚辛壬癸子丑寅卯", "癸子丑寅卯辰巳午", "寅卯辰巳午未申酉"]
    [cluster] = {arrive_alone(sessions, n, text, day=n * 0.1) for n, text in enumerate(chain)}
    assert arrive_alone(sessions, 10, "公交线路调整换乘不便等车太久", day=1) != cluster  # the row is written
    with sessions.begin() as session:
        c = case_projection.c
        oldest = (c.cluster_key == cluster, c.case_id < "LG-2026-000003")
        session.execute(case_projection.update().where(*oldest).values(status="closed"))
    assert arrive_alone(sessions, 20, "寅卯辰巳午未申酉东南西北", day=1.2) == cluster
    t = projection.cluster_words.c
    with sessions() as session:
        [words] = session.execute(select(t.words).where(t.cluster_key == cluster)).scalars()
    assert bigrams("寅卯辰巳午未申酉东南西北") <= set(words.split("\n"))
    assert bigrams("甲乙丙丁戊己庚辛") <= set(words.split("\n"))  # and keeps the closed cases' words
