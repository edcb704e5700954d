"""Retrieval quality of embeddings, sliced: by named query and gallery views, and by label.

A *view* is one way of embedding a set of posts: with both modalities, text only, image
only, or the same posts under another model. A *slice* searches one view's posts (the
queries) in another's (the gallery): within a view (``fused``), across modalities
(``text->image``: text-only queries find image-only posts), or one modality against
itself. Relevance is the same label; a post never retrieves itself, not even its own other
view, because the gallery row with the query's id is left out of its search. A query with
no label, or whose label no other gallery post has, is left out and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from postsim.core.errors import EvaluationError
from postsim.evaluation.metrics import (
    NO_EXCLUSION,
    Metric,
    chance_precision,
    check_ks,
    exact_search,
    per_query_metrics,
)
from postsim.evaluation.result import (
    EvaluationResult,
    ModalityWeights,
    RetrievalScores,
    SliceResult,
    WeightSummary,
)

DEFAULT_KS = (1, 5, 10)
_UNLABELLED = -1

POST, TEXT, IMAGE = "post", "text", "image"
"""The three views of a set of posts: as posted (both modalities where they have both), text only, image only."""
PAIR = "pair"
_PAIR_TEXT, _PAIR_IMAGE = "pair-text", "pair-image"


@dataclass(frozen=True, kw_only=True, eq=False)
class EmbeddingView:
    """Posts embedded one way: ids, labels (None: unlabelled), ``[N, dim]`` embeddings.

    ``modality_weights`` (``[N, 2]``, image then text, as the fuser outputs them) are
    optional; views that have them get a :class:`WeightSummary`.
    """

    name: str
    ids: Sequence[str]
    labels: Sequence[str | None]
    embeddings: np.ndarray
    modality_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        count = len(self.ids)
        if len(self.labels) != count or self.embeddings.ndim != 2 or len(self.embeddings) != count:
            raise EvaluationError(
                f"view {self.name!r}: {count} ids, {len(self.labels)} labels and embeddings of shape "
                f"{self.embeddings.shape}: expected one label and one [dim] row per id"
            )
        if self.modality_weights is not None and self.modality_weights.shape != (count, 2):
            raise EvaluationError(
                f"view {self.name!r}: modality_weights must be [{count}, 2], got {self.modality_weights.shape}"
            )
        repeated = [post_id for post_id, seen in Counter(self.ids).items() if seen > 1]
        if repeated:
            raise EvaluationError(f"view {self.name!r}: ids must be unique, repeated: {repeated[:5]}")


@dataclass(frozen=True)
class SliceSpec:
    """Search the posts of view ``query`` in view ``gallery``; reported as ``name``.

    ``per_label`` off skips the per-label breakdown, e.g. where every label is a single
    post's (instance retrieval) and the breakdown would be one row per post.
    """

    name: str
    query: str
    gallery: str
    per_label: bool = True

    @classmethod
    def within(cls, view: str) -> SliceSpec:
        return cls(view, view, view)

    @classmethod
    def across(cls, query: str, gallery: str) -> SliceSpec:
        return cls(f"{query}->{gallery}", query, gallery)


STANDARD_SLICES = (
    SliceSpec.within(POST),
    SliceSpec.within(TEXT),
    SliceSpec.within(IMAGE),
    SliceSpec.across(TEXT, POST),
    SliceSpec.across(IMAGE, POST),
    SliceSpec.across(TEXT, IMAGE),
    SliceSpec.across(IMAGE, TEXT),
    SliceSpec(PAIR, _PAIR_TEXT, _PAIR_IMAGE, per_label=False),  # each label is one post
)
"""The slices of :func:`standard_views`: the fused search (``post``), each single modality, a
text-only or image-only query against the posts as indexed (``text->post``, ``image->post``),
the two cross-modal searches, and ``pair``: each post's text-only view searching the
image-only views for its own image (relevance: the same post), which measures the in-post
alignment and works without labels. Training scores them in PyTorch every epoch, ``postsim
evaluate`` through the server."""


def standard_views(
    ids: Sequence[str],
    labels: Sequence[str | None],
    *,
    posted: np.ndarray,
    posted_weights: np.ndarray | None,
    text_only: np.ndarray,
    has_text: np.ndarray,
    image_only: np.ndarray,
    has_image: np.ndarray,
    has_post: np.ndarray | None = None,
) -> list[EmbeddingView]:
    """The views :data:`STANDARD_SLICES` search, from each post's three embeddings ``[N, dim]``.

    ``has_text`` and ``has_image`` (bool ``[N]``) choose the rows of ``text_only`` and
    ``image_only`` that exist; ``has_post`` those of ``posted`` (None: all of them).
    """
    everyone = np.ones(len(ids), dtype=bool) if has_post is None else np.asarray(has_post, dtype=bool)
    both = has_text & has_image
    # The pair views label each post with its own id, under ids of their own, so a text finds its own image.
    text_ids, image_ids = [f"{post_id}#{TEXT}" for post_id in ids], [f"{post_id}#{IMAGE}" for post_id in ids]
    return [
        _chosen(POST, ids, labels, everyone, posted, posted_weights),
        _chosen(TEXT, ids, labels, has_text, text_only),
        _chosen(IMAGE, ids, labels, has_image, image_only),
        _chosen(_PAIR_TEXT, text_ids, ids, both, text_only),
        _chosen(_PAIR_IMAGE, image_ids, ids, both, image_only),
    ]


def _chosen(
    name: str,
    ids: Sequence[str],
    labels: Sequence[str | None],
    chosen: np.ndarray,
    embeddings: np.ndarray,
    weights: np.ndarray | None = None,
) -> EmbeddingView:
    """The ``chosen`` rows as a view."""
    return EmbeddingView(
        name=name,
        ids=[post_id for post_id, keep in zip(ids, chosen, strict=True) if keep],
        labels=[label for label, keep in zip(labels, chosen, strict=True) if keep],
        embeddings=np.asarray(embeddings)[chosen],
        modality_weights=None if weights is None else np.asarray(weights)[chosen],
    )


def evaluate_embeddings(
    views: Sequence[EmbeddingView], slices: Sequence[SliceSpec], *, ks: Sequence[int] = DEFAULT_KS
) -> EvaluationResult:
    """Scores every slice at every k, and summarises the modality weights of every view that has them."""
    ks = check_ks(ks)
    by_name = {view.name: view for view in views}
    if len(by_name) != len(views):
        raise EvaluationError(f"view names must be unique, got {[view.name for view in views]}")
    for spec in slices:
        for role, name in (("query", spec.query), ("gallery", spec.gallery)):
            if name not in by_name:
                raise EvaluationError(f"slice {spec.name!r}: no {role} view {name!r}; the views are {sorted(by_name)}")
    results = tuple(
        score_slice(by_name[spec.query], by_name[spec.gallery], ks=ks, name=spec.name, per_label=spec.per_label)
        for spec in slices
    )
    weights = tuple(summary for view in views if (summary := summarise_weights(view)) is not None)
    return EvaluationResult(ks=ks, slices=results, modality_weights=weights)


def score_slice(
    query: EmbeddingView,
    gallery: EmbeddingView,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    name: str | None = None,
    per_label: bool = True,
) -> SliceResult:
    """Every metric at every k for ``query``'s posts searched in ``gallery``, overall and per label."""
    ks = check_ks(ks)
    if query.embeddings.shape[1] != gallery.embeddings.shape[1]:
        raise EvaluationError(
            f"view {query.name!r} has dim {query.embeddings.shape[1]}, view {gallery.name!r} "
            f"dim {gallery.embeddings.shape[1]}: they are not in one space"
        )
    codes = {label: code for code, label in enumerate(sorted({label for label in gallery.labels if label is not None}))}
    gallery_codes = np.array([_UNLABELLED if label is None else codes[label] for label in gallery.labels], np.int64)
    members = np.bincount(gallery_codes[gallery_codes >= 0], minlength=len(codes))
    row_of = {post_id: row for row, post_id in enumerate(gallery.ids)}

    query_code, own_row = _query_codes(query, codes, row_of)
    own_code = np.append(gallery_codes, _UNLABELLED)[np.where(own_row >= 0, own_row, len(gallery_codes))]
    own_same_label = (own_row >= 0) & (own_code == query_code)
    members_or_none = np.append(members, 0)  # the last entry stands for "no label in the gallery"
    relevant = members_or_none[np.where(query_code >= 0, query_code, len(codes))] - own_same_label
    unlabelled = np.array([label is None for label in query.labels], dtype=bool)
    evaluable = ~unlabelled & (relevant > 0)

    indices, _ = exact_search(query.embeddings[evaluable], gallery.embeddings, max(ks), excluded=own_row[evaluable])
    hits = gallery_codes[indices] == query_code[evaluable, None]
    candidates = len(gallery.ids) - (own_row[evaluable] >= 0)
    values = per_query_metrics(hits, relevant[evaluable], ks)

    labels = np.array([label or "" for label in query.labels], dtype=object)[evaluable]
    by_label = {
        label: _averaged(values, relevant[evaluable], candidates, ks, labels == label)
        for label in (sorted(set(labels.tolist())) if per_label else ())
    }
    return SliceResult(
        name=name or (query.name if query is gallery else f"{query.name}->{gallery.name}"),
        query_view=query.name,
        gallery_view=gallery.name,
        gallery_size=len(gallery.ids),
        scores=_averaged(values, relevant[evaluable], candidates, ks, np.ones(len(labels), dtype=bool)),
        unlabelled_queries=int(unlabelled.sum()),
        lonely_queries=int((~unlabelled & (relevant <= 0)).sum()),
        per_label=by_label,
    )


def summarise_weights(view: EmbeddingView) -> WeightSummary | None:
    """Mean image and text weight over the view's posts where the fuser weighed both, overall and per label.

    A missing modality gets weight exactly 0, so posts with a single modality (weights 1
    and 0) say nothing of the fuser and are not counted. None when the view has no weights.
    """
    if view.modality_weights is None:
        return None
    weights = np.asarray(view.modality_weights, dtype=np.float64)
    both = (weights > 0).all(axis=1)
    labels = np.array([label or "" for label in view.labels], dtype=object)
    per_label = {
        label: _mean_weights(weights[both & (labels == label)])
        for label in sorted({label for label in view.labels if label is not None})
    }
    return WeightSummary(view=view.name, overall=_mean_weights(weights[both]), per_label=per_label)


def _query_codes(query: EmbeddingView, codes: dict[str, int], row_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's label code (-1 unlabelled, -2 a label the gallery lacks) and its own gallery row (or -1)."""
    absent = -2
    query_code = np.array(
        [_UNLABELLED if label is None else codes.get(label, absent) for label in query.labels], dtype=np.int64
    )
    own_row = np.array([row_of.get(post_id, NO_EXCLUSION) for post_id in query.ids], dtype=np.int64)
    return query_code, own_row


def _averaged(
    values: dict[Metric, dict[int, np.ndarray]],
    relevant: np.ndarray,
    candidates: np.ndarray,
    ks: tuple[int, ...],
    chosen: np.ndarray,
) -> RetrievalScores:
    count = int(chosen.sum())
    return RetrievalScores(
        queries=count,
        values={
            metric: {k: float(by_k[k][chosen].mean()) if count else float("nan") for k in ks}
            for metric, by_k in values.items()
        },
        chance_precision={k: chance_precision(relevant[chosen], candidates[chosen], k) for k in ks},
    )


def _mean_weights(weights: np.ndarray) -> ModalityWeights:
    if not len(weights):
        return ModalityWeights(posts=0, image=float("nan"), text=float("nan"))
    image, text = weights.mean(axis=0)
    return ModalityWeights(posts=len(weights), image=float(image), text=float(text))
