"""Training the head on cached features (postsim.training.trainer, .data, .evaluator)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from postsim.core.errors import InvalidPostError
from postsim.corpus.split import Split, split_of
from postsim.evaluation.metrics import Metric
from postsim.evaluation.result import EvaluationResult
from postsim.evaluation.slices import IMAGE, PAIR, POST, TEXT
from postsim.training.data import HeadTrainingData, ModalityDropout, TrainingMode
from postsim.training.evaluator import HeldOutEvaluator
from postsim.training.features import PostFeatures
from postsim.training.head import TrainableHead
from postsim.training.trainer import HeadTrainer, TrainingSettings, early_peak_warning

MakeFeatures = Callable[..., tuple[PostFeatures, dict[str, str | None]]]
FAST = TrainingSettings(epochs=20, batch_size=128, learning_rate=1e-2, device="cpu")


def _data(features: PostFeatures, labels: dict[str, str | None]) -> HeadTrainingData:
    return HeadTrainingData.build(features, labels, {post_id: split_of(post_id) for post_id in features.ids})


def _head(features: PostFeatures, seed: int = 0) -> TrainableHead:
    return TrainableHead.seeded(features.image.shape[1], features.text.shape[1], dim=32, seed=seed)


def _p10(result: EvaluationResult, name: str) -> float:
    return result.slice(name).scores.value(Metric.PRECISION, 10)


def test_the_trained_head_beats_the_untrained_one_and_each_single_modality(make_features: MakeFeatures) -> None:
    features, labels = make_features()
    outcome = HeadTrainer(_head(features), _data(features, labels), FAST).fit()
    before, after = outcome.initial.held_out, outcome.best.held_out
    chance = after.slice(POST).scores.chance_precision[10]
    print(
        f"held-out P@10: untrained {_p10(before, POST):.3f}, trained {_p10(after, POST):.3f} "
        f"(text {_p10(after, TEXT):.3f}, image {_p10(after, IMAGE):.3f}, text->image {_p10(after, 'text->image'):.3f}), "
        f"chance {chance:.3f}, best epoch {outcome.best_epoch}"
    )
    assert outcome.mode is TrainingMode.SUPERVISED
    assert _p10(after, POST) > _p10(before, POST) + 0.25
    assert _p10(after, POST) > _p10(after, TEXT) + 0.05
    assert _p10(after, POST) > _p10(after, IMAGE) + 0.05
    assert _p10(after, "text->image") > 2 * chance
    assert outcome.best_epoch > 0
    # The kept head is the best epoch's: measured again, it scores what that epoch recorded.
    again = HeldOutEvaluator(_data(features, labels))(outcome.head)
    assert _p10(again, POST) == pytest.approx(_p10(after, POST))


def test_training_is_deterministic_given_the_seed(make_features: MakeFeatures) -> None:
    features, labels = make_features(posts=200)
    settings = TrainingSettings(epochs=3, batch_size=64, device="cpu", seed=5)

    def train(seed: int) -> dict[str, torch.Tensor]:
        head = HeadTrainer(
            _head(features), _data(features, labels), TrainingSettings(**{**settings.__dict__, "seed": seed})
        )
        return head.fit().head.state_dict()

    first, second, other = train(5), train(5), train(6)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(other[name], tensor) for name, tensor in first.items())


def test_modality_dropout_hides_at_most_one_modality_and_only_of_posts_with_both() -> None:
    image_present = torch.tensor([True] * 1000 + [True, False] * 50)
    text_present = torch.tensor([True] * 1000 + [False, True] * 50)
    image, text = ModalityDropout(image=0.3, text=0.2).masks(
        image_present, text_present, torch.Generator().manual_seed(0)
    )
    image, text = image[:, 0].bool(), text[:, 0].bool()
    assert (image | text).all()
    assert torch.equal(image[1000:], image_present[1000:]) and torch.equal(text[1000:], text_present[1000:])
    assert 0.25 < (~image[:1000]).float().mean() < 0.35
    assert 0.15 < (~text[:1000]).float().mean() < 0.25
    with pytest.raises(ValueError, match="add up to less than 1"):
        ModalityDropout(image=0.5, text=0.5)


def test_without_labels_the_head_learns_the_alignment_only_and_says_so(make_features: MakeFeatures) -> None:
    features, labels = make_features(posts=200)
    unlabelled = dict.fromkeys(labels)
    outcome = HeadTrainer(_head(features), _data(features, unlabelled), TrainingSettings(epochs=2, device="cpu")).fit()
    assert outcome.mode is TrainingMode.ALIGNMENT_ONLY
    assert any("no labels" in warning for warning in outcome.warnings)
    assert outcome.best.held_out.slice(POST).scores.queries == 0
    assert outcome.best.held_out.slice(PAIR).scores.queries > 0
    assert outcome.epochs[1].losses["label"] == 0.0
    assert outcome.epochs[1].losses["alignment"] > 0.0


def test_a_text_only_corpus_trains_on_its_labels(make_features: MakeFeatures) -> None:
    features, labels = make_features(posts=200)
    text_only = dataclasses.replace(
        features,
        image=np.zeros_like(features.image),
        image_present=np.zeros_like(features.image_present),
        text_present=np.ones_like(features.text_present),
    )
    outcome = HeadTrainer(_head(text_only), _data(text_only, labels), TrainingSettings(epochs=2, device="cpu")).fit()
    assert outcome.epochs[1].losses["alignment"] == 0.0
    assert outcome.best.held_out.slice(IMAGE).scores.queries == 0
    assert outcome.best.held_out.slice(TEXT).scores.queries > 0


def test_a_single_label_is_refused_with_what_to_do(make_features: MakeFeatures) -> None:
    features, labels = make_features(posts=50)
    with pytest.raises(InvalidPostError, match="single label there is nothing to contrast"):
        _data(features, dict.fromkeys(labels, "everything"))


def test_a_held_out_side_without_two_posts_of_a_label_is_refused(make_features: MakeFeatures) -> None:
    features, labels = make_features(posts=40)
    splits = {post_id: Split.TEST if index < 2 else Split.TRAIN for index, post_id in enumerate(features.ids)}
    unique = {post_id: f"only-{index}" if index < 2 else labels[post_id] for index, post_id in enumerate(features.ids)}
    data = HeadTrainingData.build(features, unique, splits)
    with pytest.raises(InvalidPostError, match="no label has two posts among the 2 held-out posts"):
        HeadTrainer(_head(features), data, FAST)


def test_an_early_peak_is_reported_with_a_lower_learning_rate_to_try() -> None:
    warning = early_peak_warning(5, 100, 3e-3)
    assert warning is not None and "epoch 5 of 100" in warning and "--learning-rate 0.0003" in warning
    assert early_peak_warning(11, 100, 3e-3) is None  # past the first tenth: not early
    assert early_peak_warning(0, 100, 3e-3) is None  # nothing learned: its own warning says so
    assert early_peak_warning(1, 10, 3e-3) is None  # too short a run to call a peak early
