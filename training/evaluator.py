"""Held-out retrieval of a head, measured with :mod:`postsim.evaluation` after every epoch.

The held-out posts are embedded three ways: as they are (``post``: both modalities where
they have both, as an index holds them), text only and image only. The slices are the
fused search (``post``), each single modality, a text-only or image-only query against the
posts as indexed (``text->post``, ``image->post``: what modality dropout is for), the two
cross-modal searches, and ``pair``:
each post's text-only view searching the image-only views for its own image (relevance:
the same post), which measures the in-post alignment and works without labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EvaluationResult
from postsim.evaluation.slices import DEFAULT_KS, EmbeddingView, SliceSpec, evaluate_embeddings
from postsim.models.modules import torch_required
from postsim.training.data import HeadTrainingData, TrainingMode
from postsim.training.head import TrainableHead

with torch_required():
    import torch

POST, TEXT, IMAGE = "post", "text", "image"
PAIR = "pair"
_PAIR_TEXT, _PAIR_IMAGE = "pair-text", "pair-image"
HELD_OUT_SLICES = (
    SliceSpec.within(POST),
    SliceSpec.within(TEXT),
    SliceSpec.within(IMAGE),
    SliceSpec.across(TEXT, POST),
    SliceSpec.across(IMAGE, POST),
    SliceSpec.across(TEXT, IMAGE),
    SliceSpec.across(IMAGE, TEXT),
    SliceSpec(PAIR, _PAIR_TEXT, _PAIR_IMAGE, per_label=False),  # each label is one post
)


class HeldOutEvaluator:
    """Scores a head on the held-out rows of ``data`` (same device)."""

    def __init__(self, data: HeadTrainingData, *, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.data = data
        self.ks = tuple(ks)
        self._rows = data.test_rows
        self._ids = [data.ids[row] for row in data.test_rows.tolist()]
        self._labels = [data.label_of(row) for row in data.test_rows.tolist()]

    def __call__(self, head: TrainableHead) -> EvaluationResult:
        was_training = head.training
        head.eval()
        try:
            views = self._views(head)
        finally:
            head.train(was_training)
        return evaluate_embeddings(views, HELD_OUT_SLICES, ks=self.ks)

    def _views(self, head: TrainableHead) -> list[EmbeddingView]:
        batch = self.data.rows(self._rows)
        image_present, text_present = batch.image_present, batch.text_present
        with torch.no_grad():
            as_posted = head(batch.image, batch.text, image_present.float()[:, None], text_present.float()[:, None])
            zeros, ones = (
                torch.zeros_like(image_present.float())[:, None],
                torch.ones_like(image_present.float())[:, None],
            )
            text_only = head(batch.image, batch.text, zeros, ones).embedding
            image_only = head(batch.image, batch.text, ones, zeros).embedding
        has_text, has_image = text_present.cpu().numpy(), image_present.cpu().numpy()
        everyone, both = np.ones(len(has_text), dtype=bool), has_text & has_image
        ids, labels = self._ids, self._labels
        # The pair views label each post with its own id, under ids of their own, so a text finds its own image.
        text_ids, image_ids = [f"{post_id}#{TEXT}" for post_id in ids], [f"{post_id}#{IMAGE}" for post_id in ids]
        return [
            _view(POST, ids, labels, everyone, as_posted.embedding, as_posted.weights),
            _view(TEXT, ids, labels, has_text, text_only),
            _view(IMAGE, ids, labels, has_image, image_only),
            _view(_PAIR_TEXT, text_ids, ids, both, text_only),
            _view(_PAIR_IMAGE, image_ids, ids, both, image_only),
        ]


def _view(
    name: str,
    ids: Sequence[str],
    labels: Sequence[str | None],
    chosen: np.ndarray,
    embeddings: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> EmbeddingView:
    """The ``chosen`` rows as a view."""
    return EmbeddingView(
        name=name,
        ids=[post_id for post_id, keep in zip(ids, chosen, strict=True) if keep],
        labels=[label for label, keep in zip(labels, chosen, strict=True) if keep],
        embeddings=embeddings.cpu().numpy()[chosen],
        modality_weights=None if weights is None else weights.cpu().numpy()[chosen],
    )


def selection_value(result: EvaluationResult, mode: TrainingMode, metric: Metric, k: int) -> float:
    """The held-out figure the best epoch is chosen by: ``metric@k`` of the fused ``post`` slice,
    or, without labels, nDCG@k of the ``pair`` slice (finding a post's own image from its text)."""
    if mode is TrainingMode.ALIGNMENT_ONLY:
        return result.slice(PAIR).scores.value(Metric.NDCG, k)
    return result.slice(POST).scores.value(metric, k)
