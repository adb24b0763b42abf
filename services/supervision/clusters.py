"""Similar cases (类案): many residents reporting one problem must become one agenda topic.

Two unresolved cases are similar when they share category and street, were received within the
cluster window of each other, and their texts share enough two-character words (bigram Jaccard
similarity — simple, and suited to Chinese, which has no spaces). Similarity chains: A~B and B~C
put A, B and C in one cluster. The numbers come from ``rules/supervision/policy.yaml``.

Clusters are kept, not recomputed: a case joins (and may merge) clusters when it arrives or its
category or street changes, and keeps its cluster key. A cluster does not split when one of its
cases is closed — it is still one problem; closed cases only stop counting.
"""

import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def bigrams(text: str) -> frozenset:
    compact = _NOT_WORD.sub("", (text or "").lower())
    # interned: the same two characters recur across cases, and the words of many are kept
    return frozenset(sys.intern(compact[i : i + 2]) for i in range(len(compact) - 1)) or frozenset([compact])


def cluster_key(category: str | None, street: str | None, first_case_id: str) -> str:
    """A cluster is named after its first case; a case alone is a cluster of one."""
    return f"cluster:{category}:{street}:{first_case_id}"


def clusters_to_join(words: frozenset, peers, threshold: float) -> list[str]:
    """The keys of the clusters a new case belongs to: those with a case similar enough to it.
    ``peers`` are ``(cluster key, peer)`` of the unresolved cases it may cluster with, with the
    peer's words in ``peer.words``; once one case of a cluster matches, the rest of that cluster
    is skipped (a big cluster costs little)."""
    joined: list[str] = []
    for key, peer in peers:
        if key not in joined and similarity(words, peer.words) >= threshold:
            joined.append(key)
    return joined


def could_be_like(words: frozenset, cluster_words: frozenset, threshold: float) -> bool:
    """False when a case with ``words`` is like no case of a cluster whose cases' words are all in
    ``cluster_words``: similarity ≥ t needs |a ∩ b| ≥ t·|a ∪ b| ≥ t·|a|, and a ∩ b ⊆ a ∩ cluster_words."""
    if not words:
        return False
    return len(words & cluster_words) >= threshold * len(words) - 1e-9


def similarity(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class Member:
    case_id: str
    category: str | None
    street: str | None
    received_at: datetime
    words: frozenset


def clusters(members: list[Member], window_days: int, threshold: float) -> dict[str, tuple[str, list[str]]]:
    """``case_id -> (cluster key, member case ids)``, all at once (the migration that introduced
    kept clusters uses it; new cases join clusters as they arrive, projection.place_in_clusters)."""
    parent = {m.case_id: m.case_id for m in members}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    groups: dict = {}
    for member in members:
        if member.category and member.street:
            groups.setdefault((member.category, member.street), []).append(member)
    window = timedelta(days=window_days)
    for group in groups.values():
        group.sort(key=lambda m: (m.received_at, m.case_id))
        for i, first in enumerate(group):
            for second in group[i + 1 :]:
                if second.received_at - first.received_at > window:
                    break  # sorted: everything after is further away
                if similarity(first.words, second.words) >= threshold:
                    parent[find(second.case_id)] = find(first.case_id)
    components: dict = {}
    for member in sorted(members, key=lambda m: (m.received_at, m.case_id)):
        components.setdefault(find(member.case_id), []).append(member)
    result = {}
    for component in components.values():
        root = component[0]  # the earliest case names the cluster, so its key is stable
        key = cluster_key(root.category, root.street, root.case_id)
        ids = [m.case_id for m in component]
        for member in component:
            result[member.case_id] = (key, ids)
    return result
