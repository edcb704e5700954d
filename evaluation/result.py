"""What an evaluation found: scores per slice and per label, the fuser's modality weights.

Library code formats; callers print. :meth:`EvaluationResult.to_dict` is the content of
``evaluation.json`` (:func:`write_json` writes it atomically), :func:`format_table` a
plain-text table with one row per slice and cut-off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postsim.core.files import write_text_atomic
from postsim.evaluation.metrics import Metric

EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True, kw_only=True)
class RetrievalScores:
    """Every metric at every k, averaged over ``queries`` queries, with the P@k of chance."""

    queries: int
    values: Mapping[Metric, Mapping[int, float]]
    chance_precision: Mapping[int, float]
    """Expected P@k of a random ranking of the same galleries (see ``chance_precision``)."""

    def value(self, metric: Metric, k: int) -> float:
        """The metric at k; KeyError names what was computed when k was not asked for."""
        by_k = self.values[metric]
        if k not in by_k:
            raise KeyError(f"{metric.at(k)} was not computed; the cut-offs are {sorted(by_k)}")
        return by_k[k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "metrics": {
                metric.value: {str(k): _number(v) for k, v in by_k.items()} for metric, by_k in self.values.items()
            },
            "chance_precision": {str(k): _number(v) for k, v in self.chance_precision.items()},
        }


@dataclass(frozen=True, kw_only=True)
class SliceResult:
    """One query view searched against one gallery view."""

    name: str
    query_view: str
    gallery_view: str
    gallery_size: int
    scores: RetrievalScores
    """Over the queries that have a label with another member in the gallery."""
    unlabelled_queries: int = 0
    """Queries left out: they have no label, so nothing is relevant to them."""
    lonely_queries: int = 0
    """Queries left out: no other gallery post has their label."""
    per_label: Mapping[str, RetrievalScores] = field(default_factory=dict)

    def to_dict(self, *, per_label: bool = True) -> dict[str, Any]:
        data = {
            "name": self.name,
            "query_view": self.query_view,
            "gallery_view": self.gallery_view,
            "gallery_size": self.gallery_size,
            "excluded_queries": {"unlabelled": self.unlabelled_queries, "label_alone": self.lonely_queries},
            **self.scores.to_dict(),
        }
        if per_label:
            data["per_label"] = {label: scores.to_dict() for label, scores in self.per_label.items()}
        return data


@dataclass(frozen=True, kw_only=True)
class ModalityWeights:
    """The fuser's mean weight of the image and of the text over ``posts`` posts."""

    posts: int
    image: float
    text: float

    def to_dict(self) -> dict[str, Any]:
        return {"posts": self.posts, "image": _number(self.image), "text": _number(self.text)}


@dataclass(frozen=True, kw_only=True)
class WeightSummary:
    """Modality weights of one view, over its posts where the fuser had both modalities to weigh."""

    view: str
    overall: ModalityWeights
    per_label: Mapping[str, ModalityWeights] = field(default_factory=dict)

    def to_dict(self, *, per_label: bool = True) -> dict[str, Any]:
        data = {"view": self.view, **self.overall.to_dict()}
        if per_label:
            data["per_label"] = {label: weights.to_dict() for label, weights in self.per_label.items()}
        return data


@dataclass(frozen=True, kw_only=True)
class EvaluationResult:
    """Scores of every slice asked for, and the modality weights of every view that has them."""

    ks: tuple[int, ...]
    slices: tuple[SliceResult, ...]
    modality_weights: tuple[WeightSummary, ...] = ()

    def slice(self, name: str) -> SliceResult:
        """The slice called ``name``; KeyError lists the slices there are."""
        for result in self.slices:
            if result.name == name:
                return result
        raise KeyError(f"no slice {name!r}; the slices are {[result.name for result in self.slices]}")

    def to_dict(self, *, per_label: bool = True) -> dict[str, Any]:
        """JSON-ready; without ``per_label``, only each slice's and view's overall figures."""
        return {
            "ks": list(self.ks),
            "slices": [result.to_dict(per_label=per_label) for result in self.slices],
            "modality_weights": [summary.to_dict(per_label=per_label) for summary in self.modality_weights],
        }


def write_json(result: EvaluationResult, path: Path) -> Path:
    """``result`` as JSON at ``path`` (``evaluation.json``), written atomically."""
    write_text_atomic(path, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def format_table(result: EvaluationResult, *, per_label: bool = False) -> str:
    """One row per slice and cut-off: the metrics at k, chance P@k and the queries counted.

    With ``per_label``, each slice's labels follow it, one row each at the largest k.
    """
    header = ["slice", "k", *(_SHORT_HEADERS[metric] for metric in Metric), "chance P", "queries", "left out"]
    rows: list[list[str]] = []
    for sliced in result.slices:
        left_out = sliced.unlabelled_queries + sliced.lonely_queries
        for k in result.ks:
            rows.append([sliced.name, str(k), *_score_cells(sliced.scores, k), str(left_out)])
        if per_label:
            k = max(result.ks)
            for label, scores in sliced.per_label.items():
                rows.append([f"  {label}", str(k), *_score_cells(scores, k), ""])
    lines = [_aligned(header, rows)]
    for summary in result.modality_weights:
        lines.append(_weights_line(summary))
    return "\n".join(lines)


_SHORT_HEADERS = {
    Metric.PRECISION: "P@k",
    Metric.RECALL: "R@k",
    Metric.NDCG: "nDCG@k",
    Metric.MRR: "MRR@k",
    Metric.MAP: "MAP@k",
}


def _score_cells(scores: RetrievalScores, k: int) -> list[str]:
    values = [_cell(scores.value(metric, k)) for metric in Metric]
    return [*values, _cell(scores.chance_precision[k]), str(scores.queries)]


def _weights_line(summary: WeightSummary) -> str:
    overall = summary.overall
    labels = ", ".join(
        f"{label} {weights.image:.2f}/{weights.text:.2f}" for label, weights in summary.per_label.items()
    )
    text = (
        f"modality weights ({summary.view}, {overall.posts} posts with both): "
        f"image {overall.image:.3f}, text {overall.text:.3f}"
    )
    return f"{text}; by label (image/text): {labels}" if labels else text


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True))]
        )

    return "\n".join([line(header), *(line(row) for row in rows)])


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _number(value: float) -> float | None:
    """JSON has no NaN: a metric over no query is null."""
    return None if math.isnan(value) else round(float(value), 6)
