"""Near-duplicate collapse: a reposted meme takes one place in the results, not ten.

Ranked results are grouped greedily, best first: a result whose cosine to a group's head
exceeds the threshold joins the highest-ranked such group as one of its duplicates;
otherwise it heads a new group. Only heads are compared with (a chain of near-duplicates
does not drift into one group). The search over-fetches and calls this again with more
candidates until it has k groups or the candidates run out; it is engine-independent,
the same for every live index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from postsim.core.errors import InvalidPostError
from postsim.model_repository.live_index.protocol import Hit
from postsim.model_repository.search_index import SearchHit


def check_collapse_threshold(threshold: object) -> float:
    """``threshold`` if it is a cosine strictly between 0 and 1."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        raise InvalidPostError(
            f"collapse threshold: a cosine strictly between 0 and 1 (0.95 folds near-identical posts), got {threshold!r}"
        )
    return float(threshold)


def optional_collapse_threshold(collapse_above: float | None) -> float | None:
    """A search's ``collapse_above``, checked (:func:`check_collapse_threshold`); None: no collapse."""
    return None if collapse_above is None else check_collapse_threshold(collapse_above)


def collapse_duplicates(ranked: Sequence[SearchHit], vectors: np.ndarray, *, above: float, k: int) -> list[Hit]:
    """At most ``k`` groups of ``ranked`` (best first), each with the near-duplicates folded into it.

    ``vectors`` holds the unit vector of each ranked result, row for row. Results after
    the ``k``-th group's head that match no head are left out.
    """
    if len(vectors) != len(ranked):
        raise ValueError(f"{len(vectors)} vectors for {len(ranked)} results")
    heads: list[int] = []
    members: dict[int, list[int]] = {}
    for position in range(len(ranked)):
        if heads:
            similar = np.flatnonzero(vectors[heads] @ vectors[position] > above)
            if len(similar):
                members[heads[similar[0]]].append(position)
                continue
        if len(heads) < k:
            heads.append(position)
            members[position] = []
    return [
        Hit(
            ranked[head].id,
            ranked[head].score,
            ranked[head].caption,
            tuple(ranked[m] for m in members[head]),
            ranked[head].row,
        )
        for head in heads
    ]
