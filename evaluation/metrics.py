"""Retrieval quality from ranked lists: precision, recall, nDCG, MRR and MAP at every k asked.

Relevance is binary (in postsim: the gallery post shares the query's label). Each metric is
computed once per query from the ranked hits and then averaged, as sentence-transformers'
``InformationRetrievalEvaluator`` does; the code knows nothing of models, only of vectors,
ranks and relevance. Search is exact cosine similarity in numpy, in chunks of queries, so a
gallery of tens of thousands of posts needs no index.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from postsim.core.errors import EvaluationError

SEARCH_CHUNK = 1024
"""Queries scored against the whole gallery at once: [chunk, N] float32 scores in memory."""
NO_EXCLUSION = -1


class Metric(enum.Enum):
    """A ranking metric at a cut-off k."""

    PRECISION = "precision"
    """Share of the k first results that are relevant."""
    RECALL = "recall"
    """Share of the query's relevant items found in the k first results."""
    NDCG = "ndcg"
    """Discounted cumulative gain of the k first results over the best achievable one."""
    MRR = "mrr"
    """Reciprocal rank of the first relevant result, 0 when none is in the k first."""
    MAP = "map"
    """Average precision at the ranks of the relevant results, over min(k, relevant items)."""

    def at(self, k: int) -> str:
        """The metric's short name at k, as tables print it: ``P@10``, ``nDCG@10`` ..."""
        return f"{_SHORT_NAMES[self]}@{k}"


_SHORT_NAMES = {
    Metric.PRECISION: "P",
    Metric.RECALL: "R",
    Metric.NDCG: "nDCG",
    Metric.MRR: "MRR",
    Metric.MAP: "MAP",
}


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The cut-offs sorted and without repeats; each must be at least 1."""
    if not ks or any(k < 1 for k in ks):
        raise EvaluationError(f"the cut-offs k must be one or more integers >= 1, got {tuple(ks)}")
    return tuple(sorted(set(ks)))


def per_query_metrics(
    hits: np.ndarray, relevant_counts: np.ndarray, ks: Sequence[int]
) -> dict[Metric, dict[int, np.ndarray]]:
    """Every metric at every k, one value per query.

    ``hits`` is ``[Q, depth]`` bool, whether the result at each rank is relevant;
    ``relevant_counts`` is ``[Q]``, how many relevant items each query has in the whole
    gallery (at least 1). Ranks past ``depth`` count as misses, and precision divides by k
    even where the gallery holds fewer than k candidates.
    """
    ks = check_ks(ks)
    found_at = np.asarray(hits, dtype=np.float64)
    queries, depth = found_at.shape
    relevant = np.asarray(relevant_counts, dtype=np.float64)
    if relevant.shape != (queries,) or (queries and relevant.min() < 1):
        raise EvaluationError(f"relevant_counts must be {queries} counts >= 1, got shape {relevant.shape}")
    ranks = np.arange(1, depth + 1, dtype=np.float64)
    cumulative = np.cumsum(found_at, axis=1)
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2, dtype=np.float64))
    ideal_gains = np.cumsum(discounts)
    has_hit = found_at.any(axis=1)
    first_hit = found_at.argmax(axis=1) if depth else np.zeros(queries, dtype=np.int64)
    first_rank = np.where(has_hit, first_hit + 1, np.inf)
    precision_at_ranks = found_at * cumulative / ranks
    metrics: dict[Metric, dict[int, np.ndarray]] = {metric: {} for metric in Metric}
    for k in ks:
        top = min(k, depth)
        found = cumulative[:, top - 1] if top else np.zeros(queries)
        metrics[Metric.PRECISION][k] = found / k
        metrics[Metric.RECALL][k] = found / relevant
        gain = (found_at[:, :top] * discounts[:top]).sum(axis=1)
        metrics[Metric.NDCG][k] = gain / ideal_gains[np.minimum(relevant, k).astype(int) - 1]
        metrics[Metric.MRR][k] = np.where(first_rank <= k, 1.0 / first_rank, 0.0)
        metrics[Metric.MAP][k] = precision_at_ranks[:, :top].sum(axis=1) / np.minimum(relevant, k)
    return metrics


def chance_precision(relevant_counts: np.ndarray, candidate_counts: np.ndarray, k: int) -> float:
    """Expected P@k of a random ranking, averaged over the queries.

    A query with R relevant items among N candidates finds, in a random order, R/N relevant
    items per rank, so ``min(k, N) * R / N`` of its k first results in expectation.
    """
    relevant = np.asarray(relevant_counts, dtype=np.float64)
    candidates = np.asarray(candidate_counts, dtype=np.float64)
    if relevant.size == 0:
        return float("nan")
    return float(np.mean(np.minimum(k, candidates) * relevant / candidates / k))


def normalized_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit L2 norm; an all-zero row stays zero."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim != 2:
        raise EvaluationError(f"expected a [N, dim] matrix of embeddings, got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


def exact_search(
    queries: np.ndarray,
    gallery: np.ndarray,
    depth: int,
    *,
    excluded: np.ndarray | None = None,
    chunk: int = SEARCH_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` most cosine-similar gallery rows of each query: (indices, scores), ``[Q, depth]``.

    ``excluded`` gives, per query, one gallery row it must never retrieve (its own post in
    the gallery), or -1. Where a query excludes a row, ``depth`` is capped at the gallery
    size minus one, so the excluded row never appears. Ties keep the lower gallery row
    first.
    """
    query_rows, gallery_rows = normalized_rows(queries), normalized_rows(gallery)
    if query_rows.shape[1] != gallery_rows.shape[1]:
        raise EvaluationError(f"queries have dim {query_rows.shape[1]} but the gallery has dim {gallery_rows.shape[1]}")
    skip = np.full(len(query_rows), NO_EXCLUSION) if excluded is None else np.asarray(excluded, dtype=np.int64)
    if skip.shape != (len(query_rows),):
        raise EvaluationError(f"excluded must have one entry per query ({len(query_rows)}), got shape {skip.shape}")
    size = len(gallery_rows)
    depth = max(0, min(depth, size - 1 if (skip >= 0).any() else size))
    indices = np.empty((len(query_rows), depth), dtype=np.int64)
    scores = np.empty((len(query_rows), depth), dtype=np.float32)
    if depth == 0:
        return indices, scores
    for start in range(0, len(query_rows), chunk):
        block = query_rows[start : start + chunk] @ gallery_rows.T
        own = skip[start : start + chunk]
        block[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf
        candidates = _top_rows(block, depth)
        candidate_scores = np.take_along_axis(block, candidates, axis=1)
        order = np.lexsort((candidates, -candidate_scores), axis=1)
        indices[start : start + chunk] = np.take_along_axis(candidates, order, axis=1)
        scores[start : start + chunk] = np.take_along_axis(candidate_scores, order, axis=1)
    return indices, scores


def _top_rows(scores: np.ndarray, depth: int) -> np.ndarray:
    """Per row, the columns of the ``depth`` highest scores (unordered); among equal scores at
    the cut, the lowest columns, so that the result does not depend on the partition's whims."""
    if depth >= scores.shape[1]:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    cut = -np.partition(-scores, depth - 1, axis=1)[:, depth - 1 : depth]
    better = scores > cut
    tied = scores == cut
    wanted = depth - better.sum(axis=1, keepdims=True)
    keep = better | (tied & (np.cumsum(tied, axis=1) <= wanted))
    return np.nonzero(keep)[1].reshape(len(scores), depth)
