"""Held-out retrieval of a head, measured with :mod:`postsim.evaluation` after every epoch.

The held-out posts are embedded three ways, as they are (``post``), text only and image
only, and scored on :data:`~postsim.evaluation.slices.STANDARD_SLICES`, the slices
``postsim evaluate`` scores through the server.
"""

from __future__ import annotations

from collections.abc import Sequence

from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EvaluationResult
from postsim.evaluation.slices import (
    DEFAULT_KS,
    PAIR,
    POST,
    STANDARD_SLICES,
    EmbeddingView,
    evaluate_embeddings,
    standard_views,
)
from postsim.models.modules import torch_required
from postsim.training.data import HeadTrainingData, TrainingMode
from postsim.training.head import TrainableHead

with torch_required():
    import torch


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
        return evaluate_embeddings(views, STANDARD_SLICES, ks=self.ks)

    def _views(self, head: TrainableHead) -> list[EmbeddingView]:
        batch = self.data.rows(self._rows)
        present = batch.image_present.float()[:, None], batch.text_present.float()[:, None]
        with torch.no_grad():
            as_posted = head(batch.image, batch.text, *present)
            zeros, ones = torch.zeros_like(present[0]), torch.ones_like(present[0])
            text_only = head(batch.image, batch.text, zeros, ones).embedding
            image_only = head(batch.image, batch.text, ones, zeros).embedding
        return standard_views(
            self._ids,
            self._labels,
            posted=as_posted.embedding.cpu().numpy(),
            posted_weights=as_posted.weights.cpu().numpy(),
            text_only=text_only.cpu().numpy(),
            has_text=batch.text_present.cpu().numpy(),
            image_only=image_only.cpu().numpy(),
            has_image=batch.image_present.cpu().numpy(),
        )


def selection_value(result: EvaluationResult, mode: TrainingMode, metric: Metric, k: int) -> float:
    """The held-out figure the best epoch is chosen by: ``metric@k`` of the fused ``post`` slice,
    or, without labels, nDCG@k of the ``pair`` slice (finding a post's own image from its text)."""
    if mode is TrainingMode.ALIGNMENT_ONLY:
        return result.slice(PAIR).scores.value(Metric.NDCG, k)
    return result.slice(POST).scores.value(metric, k)
