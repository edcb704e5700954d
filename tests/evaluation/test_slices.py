"""Sliced evaluation of embeddings, modality weights and the result's JSON and table (postsim.evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EvaluationResult, format_table, write_json
from postsim.evaluation.slices import EmbeddingView, SliceSpec, evaluate_embeddings, score_slice, summarise_weights


def _clustered_view(name: str, labels: list[str | None], *, seed: int = 0, noise: float = 0.01) -> EmbeddingView:
    """Posts of one label share a direction; the noise keeps each post its own vector."""
    rng = np.random.default_rng(seed)
    directions = {label: rng.normal(size=16) for label in sorted({label for label in labels if label is not None})}
    rows = [
        (directions[label] if label is not None else rng.normal(size=16)) + noise * rng.normal(size=16)
        for label in labels
    ]
    ids = [f"post-{index}" for index in range(len(labels))]
    return EmbeddingView(name=name, ids=ids, labels=labels, embeddings=np.array(rows))


def test_perfectly_clustered_posts_score_one_and_chance_is_stated() -> None:
    labels = ["a"] * 6 + ["b"] * 6 + ["c"] * 6
    result = score_slice(_clustered_view("fused", labels), _clustered_view("fused", labels), ks=[1, 5])
    assert result.scores.queries == 18
    for metric in (Metric.PRECISION, Metric.NDCG, Metric.MRR, Metric.MAP):
        assert result.scores.value(metric, 1) == pytest.approx(1.0), metric
    assert result.scores.value(Metric.RECALL, 1) == pytest.approx(1 / 5)
    assert result.scores.value(Metric.PRECISION, 5) == pytest.approx(1.0)
    assert result.scores.value(Metric.RECALL, 5) == pytest.approx(1.0)
    assert result.scores.chance_precision[5] == pytest.approx(5 / 17)  # 5 others of 17 candidates


def test_a_query_never_retrieves_itself_not_even_its_other_view() -> None:
    # Text and image views of the same posts with identical vectors: each query's nearest
    # gallery row is its own post, which must be skipped, so rank 1 is another post.
    labels = ["a", "b"] * 5
    text = _clustered_view("text", labels, noise=1.0)
    image = EmbeddingView(name="image", ids=text.ids, labels=labels, embeddings=text.embeddings.copy())
    result = evaluate_embeddings([text, image], [SliceSpec.across("text", "image")], ks=[1])
    sliced = result.slice("text->image")
    assert sliced.scores.queries == 10
    self_found = score_slice(
        text, EmbeddingView(name="other", ids=[f"x{i}" for i in range(10)], labels=labels, embeddings=text.embeddings)
    )
    # Under other ids the same vectors are found first and are relevant: P@1 is 1 there, and
    # strictly lower when the own post is left out (the noise mixes the labels).
    assert self_found.scores.value(Metric.PRECISION, 1) == 1.0
    assert sliced.scores.value(Metric.PRECISION, 1) < 1.0


def test_queries_without_label_or_alone_in_their_label_are_left_out_and_counted() -> None:
    labels: list[str | None] = ["a", "a", "a", "b", None, None, "c"]
    result = score_slice(_clustered_view("v", labels), _clustered_view("v", labels), ks=[1])
    assert result.scores.queries == 3  # the three "a" posts
    assert result.unlabelled_queries == 2
    assert result.lonely_queries == 2  # "b" and "c": no other post has their label
    assert set(result.per_label) == {"a"}


def test_a_gallery_without_labels_leaves_every_query_out() -> None:
    result = score_slice(_clustered_view("q", ["a", "b", None]), _clustered_view("g", [None, None, None]), ks=[1])
    assert result.scores.queries == 0
    assert (result.unlabelled_queries, result.lonely_queries) == (1, 2)


def test_an_empty_view_scores_no_query_instead_of_failing() -> None:
    empty = EmbeddingView(name="image", ids=[], labels=[], embeddings=np.zeros((0, 16)))
    assert score_slice(empty, empty).scores.queries == 0
    text = _clustered_view("text", ["a", "a", "b"])
    assert score_slice(text, empty).lonely_queries == 3
    only_itself = _clustered_view("one", ["a"])
    assert score_slice(only_itself, only_itself).scores.queries == 0


def test_per_label_scores_split_the_queries() -> None:
    labels = ["a"] * 4 + ["b"] * 8
    result = score_slice(_clustered_view("v", labels, noise=0.8), _clustered_view("v", labels, noise=0.8), ks=[3])
    assert result.per_label["a"].queries + result.per_label["b"].queries == result.scores.queries == 12
    overall = result.scores.value(Metric.NDCG, 3)
    weighted = sum(scores.queries * scores.value(Metric.NDCG, 3) for scores in result.per_label.values()) / 12
    assert overall == pytest.approx(weighted)
    assert result.per_label["a"].chance_precision[3] == pytest.approx(3 / 11)


def test_modality_weights_count_only_posts_where_the_fuser_had_both() -> None:
    weights = np.array([[0.25, 0.75], [0.75, 0.25], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    view = EmbeddingView(
        name="fused",
        ids=list("abcde"),
        labels=["x", "x", "x", "y", "y"],
        embeddings=np.eye(5),
        modality_weights=weights,
    )
    summary = summarise_weights(view)
    assert summary is not None
    assert summary.overall.posts == 3
    assert summary.overall.image == pytest.approx(0.5)
    assert summary.per_label["x"].posts == 2
    assert summary.per_label["y"].image == pytest.approx(0.5)
    assert summarise_weights(EmbeddingView(name="t", ids=["a"], labels=["x"], embeddings=np.eye(1))) is None


def test_views_and_slices_are_checked_before_any_search() -> None:
    view = _clustered_view("fused", ["a", "a"])
    with pytest.raises(ValueError, match="no gallery view 'image'"):
        evaluate_embeddings([view], [SliceSpec.across("fused", "image")])
    with pytest.raises(ValueError, match="ids must be unique"):
        EmbeddingView(name="v", ids=["a", "a"], labels=["x", "x"], embeddings=np.eye(2))
    with pytest.raises(ValueError, match="one label and one"):
        EmbeddingView(name="v", ids=["a", "b"], labels=["x"], embeddings=np.eye(2))


def _result() -> EvaluationResult:
    labels: list[str | None] = ["a"] * 5 + ["b"] * 5 + [None]
    fused = _clustered_view("fused", labels, noise=0.5)
    weighted = EmbeddingView(
        name="fused",
        ids=fused.ids,
        labels=labels,
        embeddings=fused.embeddings,
        modality_weights=np.full((11, 2), 0.5),
    )
    return evaluate_embeddings([weighted], [SliceSpec.within("fused")], ks=[1, 10])


def test_the_result_serialises_to_json_without_nan(tmp_path: Path) -> None:
    result = _result()
    path = write_json(result, tmp_path / "evaluation.json")
    data = json.loads(path.read_text())
    (fused,) = data["slices"]
    assert fused["queries"] == 10
    assert fused["excluded_queries"] == {"unlabelled": 1, "label_alone": 0}
    assert fused["metrics"]["precision"]["1"] == pytest.approx(result.slice("fused").scores.value(Metric.PRECISION, 1))
    assert fused["chance_precision"]["10"] == pytest.approx(0.4)  # 4 relevant of 10 candidates
    assert data["modality_weights"][0]["image"] == 0.5
    assert "NaN" not in path.read_text()


def test_a_slice_without_queries_reports_null_not_nan() -> None:
    lonely = _clustered_view("v", ["a", "b", "c"])
    data = evaluate_embeddings([lonely], [SliceSpec.within("v")], ks=[1]).to_dict()
    assert data["slices"][0]["metrics"]["precision"]["1"] is None
    assert math.isnan(score_slice(lonely, lonely, ks=[1]).scores.value(Metric.PRECISION, 1))


def test_the_table_has_a_row_per_slice_and_k_and_the_weights() -> None:
    table = format_table(_result(), per_label=True)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["slice", "k", "P@k", "R@k"]
    assert [line.split()[:2] for line in lines[1:3]] == [["fused", "1"], ["fused", "10"]]
    assert any(line.split()[0] == "a" for line in lines)  # per-label row
    assert "image 0.500, text 0.500" in table
