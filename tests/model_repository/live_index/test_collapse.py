"""Near-duplicate collapse of ranked results."""

from __future__ import annotations

import numpy as np
import pytest

from postsim.core.errors import InvalidPostError
from postsim.model_repository.live_index.collapse import check_collapse_threshold, collapse_duplicates
from postsim.model_repository.search_index import SearchHit


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def ranked(count: int) -> list[SearchHit]:
    return [SearchHit(f"p{n}", 1.0 - n / 100, f"caption {n}") for n in range(count)]


def test_near_duplicates_fold_into_the_highest_ranked_head() -> None:
    a, a_repost, b, a_again, c = unit(1, 0, 0), unit(1, 0.05, 0), unit(0, 1, 0), unit(1, 0, 0.05), unit(0, 0, 1)
    hits = collapse_duplicates(ranked(5), np.stack([a, a_repost, b, a_again, c]), above=0.95, k=3)
    assert [hit.id for hit in hits] == ["p0", "p2", "p4"]
    assert [n.id for n in hits[0].duplicates] == ["p1", "p3"] and hits[1].duplicates == () == hits[2].duplicates
    assert hits[0].caption == "caption 0" and hits[0].score == 1.0


def test_only_heads_are_compared_so_a_chain_does_not_drift_into_one_group() -> None:
    angles = np.radians([0, 15, 30])  # neighbours at cos 15° = 0.966; the ends at cos 30° = 0.866
    vectors = np.stack([unit(np.cos(angle), np.sin(angle)) for angle in angles])
    hits = collapse_duplicates(ranked(3), vectors, above=0.95, k=3)
    assert [hit.id for hit in hits] == ["p0", "p2"] and [n.id for n in hits[0].duplicates] == ["p1"]


def test_at_most_k_groups_and_later_duplicates_still_fold_in() -> None:
    a, b, c = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
    hits = collapse_duplicates(ranked(4), np.stack([a, b, c, a]), above=0.9, k=2)
    assert [hit.id for hit in hits] == ["p0", "p1"] and [n.id for n in hits[0].duplicates] == ["p3"]


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.2, True, "0.9", None])
def test_the_threshold_is_a_cosine_between_0_and_1(threshold: object) -> None:
    with pytest.raises(InvalidPostError, match="collapse threshold: a cosine strictly between 0 and 1"):
        check_collapse_threshold(threshold)
    assert check_collapse_threshold(0.9) == 0.9
