"""Ranking metrics and exact search (postsim.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from postsim.evaluation.metrics import Metric, chance_precision, exact_search, per_query_metrics


def test_metrics_of_one_ranking_worked_by_hand() -> None:
    # Relevant at ranks 1 and 3; the query has 3 relevant items in all.
    values = per_query_metrics(np.array([[True, False, True]]), np.array([3]), ks=[1, 3])
    dcg = 1 + 1 / math.log2(4)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert values[Metric.PRECISION][1][0] == 1.0
    assert values[Metric.PRECISION][3][0] == pytest.approx(2 / 3)
    assert values[Metric.RECALL][3][0] == pytest.approx(2 / 3)
    assert values[Metric.NDCG][3][0] == pytest.approx(dcg / ideal)
    assert values[Metric.MRR][3][0] == 1.0
    assert values[Metric.MAP][3][0] == pytest.approx((1 / 1 + 2 / 3) / 3)


def test_a_first_hit_past_k_scores_zero_reciprocal_rank_and_precision_divides_by_k() -> None:
    values = per_query_metrics(np.array([[False, False, True]]), np.array([1]), ks=[2, 3, 10])
    assert values[Metric.MRR][2][0] == 0.0
    assert values[Metric.MRR][3][0] == pytest.approx(1 / 3)
    # Only 3 results were ranked (a small gallery): P@10 still divides by 10.
    assert values[Metric.PRECISION][10][0] == pytest.approx(0.1)
    assert values[Metric.RECALL][10][0] == 1.0


def test_an_empty_ranking_finds_nothing() -> None:
    values = per_query_metrics(np.zeros((2, 0), dtype=bool), np.array([1, 3]), ks=[1, 10])
    for metric in Metric:
        assert values[metric][10].tolist() == [0.0, 0.0], metric


@pytest.mark.slow
def test_metrics_agree_with_sentence_transformers_information_retrieval_evaluator() -> None:
    evaluation = pytest.importorskip("sentence_transformers.evaluation")
    rng = np.random.default_rng(7)
    queries, gallery, depth, ks = 50, 40, 20, [1, 3, 5, 10, 20]
    relevant_sets = [set(rng.choice(gallery, size=rng.integers(1, 12), replace=False).tolist()) for _ in range(queries)]
    rankings = [rng.permutation(gallery)[:depth] for _ in range(queries)]
    evaluator = evaluation.InformationRetrievalEvaluator(
        queries={f"q{q}": "" for q in range(queries)},
        corpus={f"d{d}": "" for d in range(gallery)},
        relevant_docs={f"q{q}": {f"d{d}" for d in relevant} for q, relevant in enumerate(relevant_sets)},
        mrr_at_k=ks,
        ndcg_at_k=ks,
        accuracy_at_k=ks,
        precision_recall_at_k=ks,
        map_at_k=ks,
    )
    results = [
        [{"corpus_id": f"d{d}", "score": float(depth - rank)} for rank, d in enumerate(ranking)] for ranking in rankings
    ]
    expected = evaluator.compute_metrics(results)

    hits = np.array(
        [[d in relevant for d in ranking] for ranking, relevant in zip(rankings, relevant_sets, strict=True)]
    )
    ours = per_query_metrics(hits, np.array([len(relevant) for relevant in relevant_sets]), ks)
    names = {
        Metric.PRECISION: "precision@k",
        Metric.RECALL: "recall@k",
        Metric.NDCG: "ndcg@k",
        Metric.MRR: "mrr@k",
        Metric.MAP: "map@k",
    }
    for metric, name in names.items():
        for k in ks:
            assert ours[metric][k].mean() == pytest.approx(expected[name][k], abs=1e-12), metric.at(k)


def test_chance_precision_is_relevant_over_candidates() -> None:
    # 9 relevant of 39 candidates, and 1 of 4 (where k = 10 passes the gallery: 4 * 1/4 / 10).
    assert chance_precision(np.array([9]), np.array([39]), 10) == pytest.approx(9 / 39)
    assert chance_precision(np.array([9, 1]), np.array([39, 4]), 10) == pytest.approx((9 / 39 + 0.1) / 2)


def test_exact_search_ranks_by_cosine_like_a_brute_force_sort() -> None:
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(23, 8)), rng.normal(size=(57, 8)) * rng.uniform(0.1, 5, size=(57, 1))
    indices, scores = exact_search(queries, gallery, 10, chunk=4)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(indices, np.argsort(-cosine, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.sort(cosine, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_exact_search_never_returns_the_excluded_row_even_over_the_whole_gallery() -> None:
    gallery = np.eye(4, dtype=np.float32)
    queries = gallery.copy()  # each query's best match is its own row
    indices, _ = exact_search(queries, gallery, 10, excluded=np.arange(4))
    assert indices.shape == (4, 3)
    for query, row in enumerate(indices):
        assert query not in row


def test_exact_search_breaks_ties_by_gallery_row() -> None:
    gallery = np.ones((6, 3), dtype=np.float32)
    indices, _ = exact_search(np.ones((2, 3)), gallery, 4, excluded=np.array([2, -1]))
    np.testing.assert_array_equal(indices, [[0, 1, 3, 4], [0, 1, 2, 3]])


def test_exact_search_refuses_vectors_of_other_dimensions() -> None:
    with pytest.raises(ValueError, match="dim 8 but the gallery has dim 4"):
        exact_search(np.ones((2, 8)), np.ones((3, 4)), 2)
